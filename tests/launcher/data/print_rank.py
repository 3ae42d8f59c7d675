"""A tiny distributed script for the end-to-end launcher tests.

Every rank joins a gloo process group, all-reduces (rank + 1), and writes what it saw to
OUT_DIR/rank<R>.json: rank, world size, the sum, sys.argv, __name__ and sys.path[0].
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--flag")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "sum": total.item(),
        "argv": sys.argv,
        "name": __name__,
        "sys_path0": sys.path[0],
        "flag": args.flag,
    }
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
