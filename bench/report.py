"""Markdown tables of benchmark records (the list `bench/run.py` writes as JSON).

    python bench/report.py bench/results/h100_1b1.json    # prints the table again
    python bench/report.py --scaling bench/results/h100_7b_w2.json bench/results/h100_7b_w4.json

`markdown` is one world size's table; `scaling_markdown` puts several world sizes' records side by
side: tok/s per GPU, scaling efficiency = (tok/s per GPU at W) / (the same mode's tok/s per GPU at
the smallest W where it ran), peak memory, and the tool-against-tool ratios of `COMPARISONS`.
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
    lines += compiled_lines(records)
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "Failures:"]
        lines += [f"- `{r['mode']}`: {r['error']}" for r in failed]
    noted = [r for r in records if r.get("exit_note")]
    if noted:
        lines += ["", "Exit notes (results kept):"]
        lines += [f"- `{r['mode']}`: {r['exit_note']}" for r in noted]
    return "\n".join(lines) + "\n"


# Issue 21 (`X-compile` modes: X with --torch_compile): (numerator, denominator, target or None).
COMPILED_RATIOS = [
    ("hfzero-s3-compile", "hfzero-s3", 1.25),
    ("hfzero-s2-compile", "hfzero-s2", 1.2),
    ("plain-compile", "plain", None),
    ("fsdp2-compile", "fsdp2", None),
    ("hfzero-s3-compile", "plain-compile", 1.0),
    ("hfzero-s2-compile", "plain-compile", None),
    ("hfzero-s3-compile", "fsdp2-compile", None),
]


def compiled_lines(records: list[dict]) -> list[str]:
    """The compiled-vs-eager and compiled-vs-compiled tok/s ratios of ``COMPILED_RATIOS`` whose two
    modes both ran in this invocation; no lines when none did."""
    tok = {r["mode"]: r["tok_per_s"] for r in records if r["status"] == "ok" and r.get("tok_per_s")}
    rows = [f"| {a} / {b} | {tok[a] / tok[b]:.3f} | {'' if t is None else f'>= {t}'} |"
            for a, b, t in COMPILED_RATIOS if a in tok and b in tok]
    return ["", "| compiled ratio (tok/s) | ratio | target |", "|---|---:|---|", *rows] if rows else []


# (ours, theirs, target ratio of tok/s or None): the targets for stage 3.
COMPARISONS = [
    ("hfzero-s3", "ds-z3", 1.2),
    ("hfzero-s3", "fsdp2", 1.0),
    ("hfzero-s2", "ds-z2", None),
    ("hfzero-s2", "fsdp2", None),
]


def scaling_rows(by_world: dict[int, list[dict]]) -> list[dict]:
    """One row per (mode, W), modes in first-seen order, W ascending."""
    modes = list(dict.fromkeys(r["mode"] for w in sorted(by_world) for r in by_world[w]))
    rows = []
    for mode in modes:
        base = None  # (W, tok/s per GPU) at the smallest W where the mode ran
        for w in sorted(by_world):
            r = next((x for x in by_world[w] if x["mode"] == mode), None)
            if r is None:
                continue
            ok = r["status"] == "ok" and r.get("tok_per_s")
            per_gpu = r["tok_per_s"] / w if ok else None
            if per_gpu is not None and base is None:
                base = (w, per_gpu)
            rows.append({
                "mode": mode,
                "world_size": w,
                "status": r["status"],
                "tok_per_s": r.get("tok_per_s"),
                "tok_per_s_per_gpu": per_gpu,
                "scaling_efficiency": per_gpu / base[1] if per_gpu is not None else None,
                "efficiency_vs_world_size": base[0] if base else None,
                "mean_step_s": r.get("mean_step_s"),
                "tflops_per_gpu": r.get("tflops_per_gpu"),
                "peak_alloc_gib": r.get("peak_alloc_gib"),
                "peak_reserved_gib": r.get("peak_reserved_gib"),
                "train_peak_alloc_gib": r.get("train_peak_alloc_gib"),
                "hidden_fraction": (r.get("profile") or {}).get("hidden_fraction"),
                "error": r.get("error"),
            })
    return rows


def comparison_rows(rows: list[dict]) -> list[dict]:
    """tok/s of ours / theirs at every W where both ran, against the target where there is one."""
    at = {(r["mode"], r["world_size"]): r for r in rows}
    out = []
    for ours, theirs, target in COMPARISONS:
        for w in sorted({r["world_size"] for r in rows}):
            a, b = at.get((ours, w)), at.get((theirs, w))
            if a and b and a["tok_per_s"] and b["tok_per_s"]:
                ratio = a["tok_per_s"] / b["tok_per_s"]
                out.append({"ours": ours, "theirs": theirs, "world_size": w, "ratio": ratio, "target": target,
                            "meets_target": None if target is None else ratio >= target})
    return out


def scaling_markdown(by_world: dict[int, list[dict]], skipped_worlds: list[int] = ()) -> str:
    records = [r for w in sorted(by_world) for r in by_world[w]]
    if not records:
        return "(no records)\n"
    first = records[0]
    s, v = first["settings"], first["versions"]
    name = first["name"].rsplit("_w", 1)[0]
    lines = [
        f"# {name}: scaling",
        "",
        f"{first['device_name']} (x{first['gpu_count']} visible), world sizes {sorted(by_world)}, preset {s['preset']}, "
        f"seq {s['seq_len']}, micro batch {s['micro_batch']} per GPU, grad accum {s['grad_accum']}, "
        f"{s['max_steps']} steps ({s['warmup_steps']} warm-up not timed), "
        + (f"extra `{s['extra']}`" if s["extra"] else "no extra flags")
        + (f", model built on {s['init_device']}" if s.get("init_device") else ""),
        "",
        ", ".join(f"{k} {val}" for k, val in v.items() if val) + f", commit {first['git_commit']}",
        "",
        "Scaling efficiency: tok/s per GPU at W over the same mode's at the smallest W where it ran (`eff vs`).",
        "",
        "| mode | W | status | tok/s | tok/s/GPU | eff | eff vs W | step s | TFLOP/s/GPU | peak alloc GiB "
        "| train peak alloc GiB | peak reserved GiB | comm hidden |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = scaling_rows(by_world)
    for r in rows:
        eff = r["scaling_efficiency"]
        hidden = r["hidden_fraction"]
        lines.append("| " + " | ".join([
            r["mode"], str(r["world_size"]), r["status"], _num(r["tok_per_s"], 0), _num(r["tok_per_s_per_gpu"], 0),
            "" if eff is None else f"{100 * eff:.0f}%", "" if r["efficiency_vs_world_size"] is None
            else str(r["efficiency_vs_world_size"]), _num(r["mean_step_s"], 3), _num(r["tflops_per_gpu"], 1),
            _num(r["peak_alloc_gib"], 2), _num(r.get("train_peak_alloc_gib"), 2), _num(r["peak_reserved_gib"], 2),
            "" if hidden is None else f"{100 * hidden:.0f}%",
        ]) + " |")
    comps = comparison_rows(rows)
    if comps:
        lines += ["", "| ours | theirs | W | tok/s ratio | target | met |", "|---|---|---:|---:|---:|---|"]
        for c in comps:
            met = "" if c["meets_target"] is None else ("yes" if c["meets_target"] else "**no**")
            target = "" if c["target"] is None else f">= {c['target']:.1f}"
            lines.append(f"| {c['ours']} | {c['theirs']} | {c['world_size']} | {c['ratio']:.2f} | {target} | {met} |")
    if skipped_worlds:
        lines += ["", f"World sizes skipped (more than the visible GPUs): {list(skipped_worlds)}"]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Failures:"]
        lines += [f"- `{r['mode']}` W = {r['world_size']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--scaling"]:
        by_world: dict[int, list[dict]] = {}
        for path in args[1:]:
            with open(path) as f:
                recs = json.load(f)
            by_world.setdefault(recs[0]["world_size"], []).extend(recs)
        print(scaling_markdown(by_world))
    else:
        for path in args:
            with open(path) as f:
                print(markdown(json.load(f)))
