"""Markdown table of benchmark records (the list `bench/run.py` writes as JSON).

    python bench/report.py bench/results/h100_1b1.json    # prints the table again
"""

import json
import sys


def _num(value, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _dtypes(counts: dict | None) -> str:
    return "/".join(sorted(counts)) if counts else ""


def markdown(records: list[dict]) -> str:
    if not records:
        return "(no records)\n"
    first = records[0]
    s, v = first["settings"], first["versions"]
    lines = [
        f"# {first['name']}",
        "",
        f"{first['device_name']} (x{first['gpu_count']} visible), world {first['world_size']}, preset {s['preset']}, "
        f"seq {s['seq_len']}, micro batch {s['micro_batch']}, grad accum {s['grad_accum']}, "
        f"{s['max_steps']} steps ({s['warmup_steps']} warm-up not timed), "
        + (f"extra `{s['extra']}`" if s["extra"] else "no extra flags"),
        "",
        ", ".join(f"{k} {val}" for k, val in v.items() if val) + f", commit {first['git_commit']}",
        "",
        "| mode | status | tok/s | x plain | step s | TFLOP/s/GPU | peak alloc GiB | peak reserved GiB "
        "| host RSS GiB | loss | param dtype | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        ok = r["status"] == "ok"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["mode"],
                    r["status"],
                    _num(r.get("tok_per_s"), 0),
                    _num(r.get("x_plain"), 2),
                    _num(r.get("mean_step_s"), 3),
                    _num(r.get("tflops_per_gpu"), 1),
                    _num(r.get("peak_alloc_gib"), 2),
                    _num(r.get("peak_reserved_gib"), 2),
                    _num(r.get("host_rss_gib"), 2),
                    _num(r.get("final_loss"), 4) if ok else "",
                    _dtypes(r.get("param_dtypes")),
                    _num(r.get("wall_s"), 0),
                ]
            )
            + " |"
        )
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "Failures:"]
        lines += [f"- `{r['mode']}`: {r['error']}" for r in failed]
    noted = [r for r in records if r.get("exit_note")]
    if noted:
        lines += ["", "Exit notes (results kept):"]
        lines += [f"- `{r['mode']}`: {r['exit_note']}" for r in noted]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(markdown(json.load(f)))
