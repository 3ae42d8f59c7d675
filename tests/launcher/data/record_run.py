"""Records how hf_zero.run started it, for the in-process tests of `hf_zero.run`.

Writes JSON to the path in HF_ZERO_TEST_RECORD: sys.argv, __name__, sys.path[0] and the
torch.distributed variables. Exits with the code in HF_ZERO_TEST_EXIT, if set.
"""

import json
import os
import sys

VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

if __name__ == "__main__":
    record = {
        "argv": sys.argv,
        "name": __name__,
        "sys_path0": sys.path[0],
        "env": {name: os.environ.get(name) for name in VARIABLES},
    }
    with open(os.environ["HF_ZERO_TEST_RECORD"], "w") as file:
        json.dump(record, file)
    if os.environ.get("HF_ZERO_TEST_EXIT"):
        sys.exit(int(os.environ["HF_ZERO_TEST_EXIT"]))
