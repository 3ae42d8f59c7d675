"""``--torch_compile`` through the Trainer on 2 gloo ranks (issue 21): stages 1-3 train compiled
as they train eagerly, the compiled code is made in the first steps and never again (no new
frames, graphs or graph breaks after them, and any recompilation raises), every graph break is
one of hf_zero's eager hooks or one the plain Trainer's compiled run has too, and a compiled run
saved mid-way and resumed ends with the params and optimizer state of the uninterrupted compiled
run, bit for bit, both within the compiled-vs-eager tolerance of the eager run (stages 1-3).
Covered: stages 0-3; optimizer offload (stage 2), parameter offload (stage 3); gradient
checkpointing at stages 1 and 3; accelerate's regional compilation; inductor at stage 3.

Backend: ``aot_eager`` (dynamo's capture and AOTAutograd's forward/backward split, as inductor
gets them, without inductor's code generation, which costs about two minutes per rank on this
CPU for the first compile of even the tiny model). The captured graphs, the guards and the
graph breaks are the same; only the kernels differ. One test runs inductor at stage 3, where the
issue's run failed (``wrong number of dimensions1`` inside inductor's code).

Rank starts: the runs of one kind share one start, made once for the module: stages 0-3 eager and
compiled (the stage 1-3 pairs saving at steps 2 and 4), the offload and checkpointing cases eager and
compiled. Every run begins with dynamo as a new process has it (``_fresh_dynamo``: no compiled
code, counters and compile time at 0), so its counts, graph breaks and compile seconds are its own.
The graph breaks at stage 3 are those of the stage-3 checkpointing case; stage 2's run, the resumes
of the compiled stage 1-3 checkpoints (one start for the three: a resume is a new process), inductor
and regional compilation (which sets a variable for its process) each start alone, held to the
eager runs of the first start.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks

STEPS = 4
WARM = 2  # steps in which compilation may happen: the first forward/backward, and the first after an optimizer step
RTOL = 1e-5  # aot_eager runs the same aten ops as eager: only the summation order of a fused few may differ


def _counts() -> dict[str, int]:
    """Dynamo's running totals in this process: frames compiled, graphs made, graph breaks."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


class _Counts(TrainerCallback):
    """Dynamo's totals at the end of every step; recompiling raises once ``WARM`` steps are done."""

    def __init__(self):
        self.per_step: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(_counts())
        if len(self.per_step) == WARM:  # steps of this run (a resumed run starts at the checkpoint's)
            torch._dynamo.config.error_on_recompile = True


def _job(rank, world, out, stage, compiled, options=None):
    return _train(out, stage, compiled, **(options or {}))


def _cases_job(rank, world, out, cases):
    """For every ``(stage, options)`` of ``cases``, one after another: the eager run, then the compiled one."""
    return [(_train(out / str(i) / "eager", stage, False, **options),
             _train(out / str(i) / "compiled", stage, True, **options)) for i, (stage, options) in enumerate(cases)]


def _eager_and_compiled(out, cases) -> list[list[tuple[dict, dict]]]:
    """Per case of ``cases`` (``(stage, options)``), per rank: (eager, compiled), from one start."""
    per_rank = run_on_ranks(_cases_job, 2, out, cases, timeout=600)
    return [[ranks[i] for ranks in per_rank] for i in range(len(cases))]


STAGES = (0, 1, 2, 3)
RESUMED_STAGES = (1, 2, 3)  # their runs in ``like_eager`` save every SAVE_STEPS; their compiled runs are resumed
SAVE_STEPS = 2


@pytest.fixture(scope="module")
def like_eager_root(tmp_path_factory):
    """Where ``like_eager`` runs: case ``i`` (stage ``STAGES[i]``) in ``i/eager`` and ``i/compiled``."""
    return tmp_path_factory.mktemp("like_eager")


@pytest.fixture(scope="module")
def like_eager(like_eager_root) -> dict[int, list[tuple[dict, dict]]]:
    """Per stage, per rank: (eager, compiled) runs of ``STEPS`` steps, one start for all; stages 1-3 save at
    steps 2 and 4 (test_compiled_saves_and_resumes resumes their compiled runs' checkpoint-2)."""
    cases = [(s, {"save_steps": SAVE_STEPS} if s in RESUMED_STAGES else {}) for s in STAGES]
    return dict(zip(STAGES, _eager_and_compiled(like_eager_root, cases)))


def _fresh_dynamo() -> None:
    """Dynamo as a new process has it: no compiled code or guards, its counters and compile times at 0
    (what ``_counts``, ``_graph_breaks`` and the report's compile seconds read), so that every run of a
    shared rank start is counted alone and compiles afresh."""
    from torch._dynamo.utils import counters, cumulative_time_spent_ns

    torch._dynamo.reset()
    counters.clear()
    cumulative_time_spent_ns.clear()


def _graph_breaks() -> dict[str, int]:
    """Dynamo's graph breaks in this process by reason: its title and explanation (the lines that name
    what broke, without the code addresses dynamo adds below them)."""
    from torch._dynamo.utils import counters

    out: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        key = " / ".join(line.strip() for line in reason.splitlines()[:2])
        out[key] = out.get(key, 0) + n
    return out


def _train(out, stage, compiled, backend="aot_eager", max_steps=STEPS, save_steps=0, resume=False,
           gradient_checkpointing=False, offload=None, max_grad_norm=1.0, zero=True, regional=False,
           inductor_cache=None):
    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S

    _fresh_dynamo()
    if regional:  # accelerate reads it when the Trainer makes its Accelerator; this process only
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1"
    if inductor_cache is not None:
        # Read at compile time (set here, not in the caller's environment: that would spawn fresh
        # ranks). One compile thread: a pool of compile workers would import torch again in each.
        import torch._inductor.config as inductor_config

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
        inductor_config.compile_threads = 1

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (32, 12), generator=g)]
    extra = {"torch_compile": True, "torch_compile_backend": backend} if compiled else {}
    if gradient_checkpointing:
        extra["gradient_checkpointing"] = True
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=max_steps,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, max_grad_norm=max_grad_norm, **extra)
    zero_config = {"stage": stage, "stage3_param_persistence_threshold": 0}
    for what in {"optimizer": ["optimizer"], "param": ["optimizer", "param"], None: []}[offload]:
        zero_config[f"offload_{what}"] = {"device": "cpu"}  # parameter offload comes with optimizer offload
    if zero:
        zt.activate({"zero_optimization": zero_config})
    counts = _Counts()
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[counts])
        trainer.train(resume_from_checkpoint=resume or None)
        # the run report as rank 0 writes it, every rank's figures (none without hf_zero)
        report = S.session_of(trainer).figures if zero else {"ranks": []}
    finally:
        zt.deactivate()
        torch._dynamo.config.error_on_recompile = False
    logs = trainer.state.log_history
    return {"loss": [h["loss"] for h in logs if "loss" in h],
            "grad_norm": [h["grad_norm"] for h in logs if "grad_norm" in h],
            "counts": counts.per_step, "compile_seconds": [r["compile_seconds"] for r in report["ranks"]],
            "graph_breaks": _graph_breaks()}


def _check(got: dict, ref: dict, steps: int = STEPS, rtol: float = RTOL) -> None:
    assert len(got["loss"]) == len(ref["loss"]) == steps, (got, ref)
    for key in ("loss", "grad_norm"):
        for a, b in zip(got[key], ref[key]):
            assert abs(a - b) <= rtol * abs(b), (key, got[key], ref[key])
    assert ref["loss"][-1] != ref["loss"][0]


def _compiled_once(counts: list[dict], warm: int = WARM) -> None:
    """Something was compiled, and nothing more after the first ``warm`` steps."""
    assert counts[0]["frames"] > 0 and counts[0]["graphs"] > 0, counts
    assert all(c == counts[warm - 1] for c in counts[warm - 1:]), counts


@pytest.mark.parametrize("stage", STAGES)
def test_compiled_trains_like_eager(stage, like_eager):
    for ref, got in like_eager[stage]:
        assert ref["counts"][-1]["frames"] == 0  # the eager run compiled nothing
        assert ref["compile_seconds"] == [0.0, 0.0] and min(got["compile_seconds"]) > 0
        _check(got, ref)
        _compiled_once(got["counts"])


OPTION_CASES = {
    # no clipping: the host step runs on across the next forward (ForwardGates)
    "stage2-optimizer-offload-overlap": (2, {"offload": "optimizer", "gradient_checkpointing": False,
                                             "max_grad_norm": 0.0}),
    "stage3-param-offload": (3, {"offload": "param", "gradient_checkpointing": False, "max_grad_norm": 1.0}),
    "stage3-gradient-checkpointing": (3, {"offload": None, "gradient_checkpointing": True, "max_grad_norm": 1.0}),
    # the flat strategies (stages 1-2) under checkpointing's recompute
    "stage1-gradient-checkpointing": (1, {"offload": None, "gradient_checkpointing": True, "max_grad_norm": 1.0}),
}


@pytest.fixture(scope="module")
def with_options(tmp_path_factory) -> dict[str, list[tuple[dict, dict]]]:
    """Per case of ``OPTION_CASES``, per rank: (eager, compiled), one start for all."""
    pairs = _eager_and_compiled(tmp_path_factory.mktemp("with_options"), list(OPTION_CASES.values()))
    return dict(zip(OPTION_CASES, pairs))


@pytest.mark.parametrize("case", OPTION_CASES)
def test_compiled_with_offload_and_checkpointing(case, with_options):
    pairs = with_options[case]
    offload = OPTION_CASES[case][1]["offload"]
    got = [compiled for _, compiled in pairs]
    for rank, (ref, compiled) in enumerate(pairs):
        _check(compiled, ref)
        _compiled_once(compiled["counts"])
        if offload is not None:
            # The offload gates ([Note: gate points] in step_overlap.py) break the graph only at block
            # boundaries: at most once per gate point (2 decoder layers, embeddings, final norm, LM head)
            # and once more where transformers' deprecation wrapper, shared by LlamaForCausalLM.forward
            # and LlamaModel.forward, is compiled again for the second class. A gate on every module
            # with params broke each layer at its 7 Linears and 2 norms: 20 breaks, 17 graphs.
            gates = sum(n for reason, n in got[rank]["graph_breaks"].items() if "waits for the host step" in reason)
            assert gates <= 5 + 1, got[rank]["graph_breaks"]


def _plain_job(rank, world, out, options):
    return _train(out, 0, True, zero=False, **options)


GRAPH_BREAK_OPTIONS = {"gradient_checkpointing": True, "max_steps": 2}


@pytest.fixture(scope="module")
def plain_compiled(tmp_path_factory) -> dict:
    """The plain Trainer's compiled run (one process, no hf_zero) with ``GRAPH_BREAK_OPTIONS``."""
    [plain] = run_on_ranks(_plain_job, 1, tmp_path_factory.mktemp("plain"), GRAPH_BREAK_OPTIONS, timeout=300)
    return plain


GRAPH_BREAK_STAGES = (2, 3)


@pytest.fixture(scope="module")
def graph_break_runs(tmp_path_factory, with_options) -> dict[int, list[dict]]:
    """Per stage of ``GRAPH_BREAK_STAGES``, per rank: a compiled run with gradient checkpointing. Stage 3's
    is the compiled run of ``with_options``'s "stage3-gradient-checkpointing" (``STEPS`` steps: it compiles
    nothing after the first ``WARM``, which test_compiled_with_offload_and_checkpointing checks, so it has
    the graph breaks of a ``GRAPH_BREAK_OPTIONS`` run); stage 2's is made with ``GRAPH_BREAK_OPTIONS``."""
    stage2 = run_on_ranks(_job, 2, tmp_path_factory.mktemp("graph_breaks"), 2, True, GRAPH_BREAK_OPTIONS, timeout=300)
    return {2: stage2, 3: [compiled for _, compiled in with_options["stage3-gradient-checkpointing"]]}


@pytest.mark.parametrize("stage", GRAPH_BREAK_STAGES)
def test_graph_breaks_are_the_models_or_hf_zeros_eager_hooks(stage, plain_compiled, graph_break_runs):
    """Every graph break of a compiled hf_zero run is either one of hf_zero's hooks that run eagerly by
    design (torch.compiler.disable, its reason naming hf_zero: the report's token count, the stage-3
    unit hooks) or one the plain Trainer's compiled run of the same model has too (one process, no
    hf_zero; with gradient checkpointing transformers' own output capture breaks there). A hook of
    hf_zero's that torch traced and broke on (a .item(), a data-dependent branch) would add a reason."""
    plain = plain_compiled
    got = graph_break_runs[stage]
    for rank in range(2):
        eager_hooks = {r: n for r, n in got[rank]["graph_breaks"].items()
                       if r.startswith("Skip calling `torch.compiler.disable()`d function")}
        assert eager_hooks and all("(reason: hf_zero " in r for r in eager_hooks), eager_hooks
        others = set(got[rank]["graph_breaks"]) - set(eager_hooks)
        assert others <= set(plain["graph_breaks"]), (others, plain["graph_breaks"])


def _eager_stage3(like_eager) -> list[dict]:
    return [eager for eager, _ in like_eager[3]]


def _resumes_job(rank, world, out, like_eager_root):
    """For every stage of ``RESUMED_STAGES``: a compiled run resumed from checkpoint-``SAVE_STEPS`` of
    that stage's compiled run in ``like_eager``, saving as it did (its last save in ``out/{stage}``)."""
    return {stage: _train(out / str(stage), stage, True, save_steps=SAVE_STEPS,
                          resume=str(like_eager_root / str(STAGES.index(stage)) / "compiled" / f"checkpoint-{SAVE_STEPS}"))
            for stage in RESUMED_STAGES}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, like_eager, like_eager_root) -> tuple:
    """Where the resumed runs saved, and per stage of ``RESUMED_STAGES``, per rank: the run, one start for all."""
    out = tmp_path_factory.mktemp("resumed")
    per_rank = run_on_ranks(_resumes_job, 2, out, like_eager_root, timeout=300)
    return out, {stage: [ranks[stage] for ranks in per_rank] for stage in RESUMED_STAGES}


def _saved(checkpoint) -> dict[str, torch.Tensor]:
    """What a Trainer checkpoint holds of the training state, by name, in full shapes (the same at any
    stage or world size): from the sharded state, each param's fp32 master (``master/{param}``) and
    each optimizer state (``optim/{param}/{key}``: Adam's moments and step); the weights of
    model.safetensors (``model/{param}``)."""
    from safetensors.torch import load_file

    from hf_zero.checkpoint import safe_reader, sharded

    path = os.path.join(checkpoint, sharded.DIR_NAME)
    stored = sharded.check_files(path).state_dict_metadata
    state = {key: torch.empty(info.size, dtype=info.properties.dtype) for key, info in stored.items()
             if key.startswith(("master/", "optim/"))}
    with warnings.catch_warnings():  # DCP's note that it loads in one process: it does, by design
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        safe_reader.dcp_load(state, path, no_dist=True)
    state.update({f"model/{n}": t for n, t in load_file(os.path.join(checkpoint, "model.safetensors")).items()})
    return state


@pytest.mark.parametrize("stage", RESUMED_STAGES)
def test_compiled_saves_and_resumes(stage, like_eager, like_eager_root, resumed):
    """A compiled run saves at steps 2 and 4 (the compiled run of ``like_eager``, which
    test_compiled_trains_like_eager holds to eager); a new compiled run resumed from step 2 ends as it
    does, bit for bit: its losses, grad norms, params and optimizer state (compiled runs here are
    deterministic: the same aten ops on the same data and ranks, in the same order, gloo's sums of 2
    ranks included), and both are within RTOL of the eager run (which saved at the same steps). The
    params and optimizer state are read from each run's last checkpoint (``_saved``)."""
    out, runs = resumed
    for rank, (ref, full) in enumerate(like_eager[stage]):
        got = runs[stage][rank]
        # The log history of steps 1-2 comes back with the checkpoint's trainer state.
        _check(got, ref)
        assert (got["loss"], got["grad_norm"]) == (full["loss"], full["grad_norm"]), (got, full)
        assert len(got["counts"]) == STEPS - SAVE_STEPS and got["counts"][0]["graphs"] > 0
    run = like_eager_root / str(STAGES.index(stage))
    eager, full, got = (_saved(folder / f"checkpoint-{STEPS}") for folder in (run / "eager", run / "compiled", out / str(stage)))
    assert got.keys() == full.keys() == eager.keys()
    assert {k.split("/")[0] for k in full} == {"master", "optim", "model"}
    assert {k.rsplit("/", 1)[1] for k in full if k.startswith("optim/")} == {"exp_avg", "exp_avg_sq", "step"}
    different = [name for name in full if not torch.equal(got[name], full[name])]
    assert not different, different
    for name, ref in eager.items():
        # Elementwise RTOL, and RTOL of the tensor's largest magnitude: the last bits of a grad (the
        # compiled backward's summation order; at stages 1-2 the grad norms differ there from step 1)
        # move an element near 0 by much more than RTOL of its own size after 4 Adam steps (measured:
        # at most 2.4e-6 of the largest magnitude at stages 1-2, o_proj's params; stage 3 is exact).
        scale = RTOL * ref.abs().max().item()
        for what, state in (("uninterrupted", full), ("resumed", got)):
            torch.testing.assert_close(state[name], ref, rtol=RTOL, atol=scale,
                                       msg=lambda m, what=what, name=name: f"{what}: {name}: {m}")


def test_inductor_stage3(tmp_path, like_eager):
    """The issue's run: inductor at stage 3 (its cache in ``tmp_path``: compiled from scratch)."""
    ref = _eager_stage3(like_eager)
    options = {"backend": "inductor", "inductor_cache": tmp_path / "inductor"}
    got = run_on_ranks(_job, 2, tmp_path / "compiled", 3, True, options, timeout=600)
    for rank in range(2):
        _check(got[rank], ref[rank], rtol=1e-4)  # inductor's fused kernels sum in another order
        _compiled_once(got[rank]["counts"])


def test_regional_compilation_stage3(tmp_path, like_eager):
    """accelerate's regional compilation (each decoder layer and each leaf module compiled apart,
    on copies of the modules that share their hooks and params) at stage 3."""
    ref = _eager_stage3(like_eager)
    got = run_on_ranks(_job, 2, tmp_path / "compiled", 3, True, {"regional": True}, timeout=300)
    for rank in range(2):
        _check(got[rank], ref[rank])
        _compiled_once(got[rank]["counts"])
