"""DeepSpeed's ``optimizer`` block: which torch optimizer DeepSpeed builds for each ``type``.

What DeepSpeed 0.19 does (``runtime/engine.py``, ``_configure_basic_optimizer``), and so hf_zero:

- ``type`` is compared without case for DeepSpeed's own names (``adam``, ``adamw``, ``adagrad``,
  ``lamb``, ``lion``, ``muadam``, ``muadamw``, ``musgd``, ``muon``); any other name is looked up
  as written in ``torch.optim`` (``"SGD"``, ``"RMSprop"``: case matters there).
- ``"Adam"`` and ``"AdamW"`` build FusedAdam (GPU), DeepSpeedCPUAdam (offload) or, with
  ``torch_adam``, ``torch.optim.Adam(W)``: one Adam update, AdamW's decoupled weight decay unless
  ``type`` is ``"Adam"`` with ``adam_w_mode`` false. Their defaults are FusedAdam's: lr 1e-3,
  betas (0.9, 0.999), eps 1e-8, weight_decay 0 (not torch AdamW's 0.01), so hf_zero passes all four.
- ``"Adagrad"`` and the other ``torch.optim`` names build that torch class with ``params`` as
  written, torch's defaults for the rest.
- The optimizer gets the model's trainable parameters as one group: ``weight_decay`` applies to
  every one of them, biases and norms included (the Trainer's own optimizer exempts those).

Types DeepSpeed builds and hf_zero cannot (:data:`REFUSED`) load here, their params unchecked, and
are refused by the one table of what this version cannot run (``config/unsupported.py``, row
"optimizer-type"): ``check-config``, ``doctor``, the launch preflight, every rank and the Trainer
refuse them the same way, before anything runs.
Nothing here imports torch: ``tests/config/test_optimizer_block.py`` holds :data:`TORCH_TYPES`
against the installed torch's signatures.
"""

from __future__ import annotations

import difflib
from typing import Any

from hf_zero.config import checks
from hf_zero.config.auto import AUTO

ADAM_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
"""FusedAdam's and DeepSpeedCPUAdam's defaults, passed to torch for every key the block leaves out."""

ADAM_SWITCHES = ("adam_w_mode", "torch_adam", "bias_correction", "set_grad_none")
"""DeepSpeed Adam params that choose the implementation rather than feed torch's constructor."""

_ADAM_KEYS = (*ADAM_DEFAULTS, "amsgrad", "foreach", "maximize", *ADAM_SWITCHES)

TORCH_TYPES: dict[str, tuple[str, ...]] = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach"),
    "Adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "foreach", "maximize"),
    "Adamax": ("lr", "betas", "eps", "weight_decay", "foreach", "maximize"),
    "NAdam": ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "foreach",
              "maximize"),
    "RAdam": ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "foreach", "maximize"),
    "Adadelta": ("lr", "rho", "eps", "weight_decay", "foreach", "maximize"),
    "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "foreach", "maximize"),
    "Rprop": ("lr", "etas", "step_sizes", "foreach", "maximize"),
    "ASGD": ("lr", "lambd", "alpha", "t0", "weight_decay", "foreach", "maximize"),
}
"""``torch.optim`` classes a ``type`` may name (besides Adam/AdamW) -> the params hf_zero passes on.

Each steps every element on its own, so it runs on flat shards exactly as on whole tensors."""

_CASELESS = {"adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad"}  # DeepSpeed lowercases its own names

REFUSED: dict[str, str] = {
    "lamb": "LAMB (DeepSpeed's FusedLamb is a CUDA kernel of its own, and torch has no LAMB)",
    "onebitlamb": "1-bit LAMB (DeepSpeed's LAMB with compressed communication; torch has no LAMB)",
    "onebitadam": "1-bit Adam's compressed gradient communication (\"AdamW\" is the same update without it)",
    "zerooneadam": "0/1 Adam's compressed gradient communication (\"AdamW\" is the same update without it)",
    "lion": "Lion (DeepSpeed's FusedLion / CPU Lion are kernels of its own, and torch has no Lion)",
    "muadam": "mup's MuAdam (width-scaled learning rates; \"Adam\" is the update without mup's scaling)",
    "muadamw": "mup's MuAdamW (width-scaled learning rates; \"AdamW\" is the update without mup's scaling)",
    "musgd": "mup's MuSGD (width-scaled learning rates; \"SGD\" is the update without mup's scaling)",
    "muon": "Muon on flat shards (Muon orthogonalises whole 2-D matrices, and hf_zero steps on flat shards of them)",
    "lbfgs": "LBFGS (it needs a closure that re-evaluates the whole model each step)",
    "sparseadam": "SparseAdam (it needs sparse gradients, and hf_zero reduces dense ones)",
}
"""Lowercased names DeepSpeed (or torch.optim) builds that hf_zero cannot -> what is missing, as the
``<FEATURE> is not implemented in hf_zero`` part of the table's message (config/unsupported.py)."""


def refused(written: str) -> str | None:
    """What hf_zero lacks to build ``type`` as written (a REFUSED entry), or None."""
    return REFUSED.get(written.lower())


def allowed_types() -> list[str]:
    """The ``type`` values hf_zero builds, as they are best written."""
    return ["Adam", "AdamW", *TORCH_TYPES]


def canonical_type(written: str) -> str | None:
    """The torch.optim class name for ``type`` as written (DeepSpeed's rules), or None."""
    if written.lower() in _CASELESS:
        return _CASELESS[written.lower()]
    return written if written in TORCH_TYPES else None


def is_adam(canonical: str) -> bool:
    return canonical in ("Adam", "AdamW")


def torch_class(written: str, params: dict[str, Any]) -> str:
    """The torch.optim class DeepSpeed would run: Adam with ``adam_w_mode`` false only for ``"Adam"``."""
    canonical = canonical_type(written)
    if canonical is None:
        raise ValueError(f"optimizer.type {written!r} is not one hf_zero builds")
    if canonical == "Adam" and params.get("adam_w_mode", True) is False:
        return "Adam"
    return "AdamW" if is_adam(canonical) else canonical


def valid_keys(written: str) -> tuple[str, ...]:
    canonical = canonical_type(written)
    return _ADAM_KEYS if is_adam(canonical) else TORCH_TYPES[canonical]


def check(spec: Any) -> None:
    """Validate an OptimizerSpec's ``type`` and the names (and a few values) of its ``params``."""
    written = spec.type
    if refused(written) is not None:
        return  # a DeepSpeed type: the table refuses it (config/unsupported.py); its params are not ours to check
    if canonical_type(written) is None:
        raise _refusal(spec, written)
    params = spec.params
    if "max_grad_norm" in params:  # DeepSpeed's own refusal, for the same reason
        raise checks.fail(spec, "params.max_grad_norm", "not an optimizer parameter under DeepSpeed or hf_zero",
                          value=params["max_grad_norm"], allowed='the top-level "gradient_clipping" key instead')
    keys = valid_keys(written)
    for key in params:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise checks.fail(spec, f"params.{key}", f"not a parameter of {written}{hint}", value=params[key],
                              allowed=", ".join(keys))
    if is_adam(canonical_type(written)):
        _check_adam(spec, params)


def _check_adam(spec: Any, params: dict[str, Any]) -> None:
    for key in ("adam_w_mode", "torch_adam", "amsgrad", "set_grad_none", "maximize"):
        if key in params and not isinstance(params[key], bool):
            raise checks.fail(spec, f"params.{key}", "not a boolean", value=params[key], allowed="true or false")
    if params.get("bias_correction", True) is not True:
        raise checks.fail(spec, "params.bias_correction", "Adam without bias correction has no torch equivalent",
                          value=params["bias_correction"], allowed="true (the default)")
    for key in ("lr", "eps", "weight_decay"):
        value = params.get(key)
        if value is not None and value is not AUTO and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                         or value < 0):
            raise checks.fail(spec, f"params.{key}", "not a number >= 0", value=value,
                              allowed='a number >= 0 or "auto"')
    betas = params.get("betas")
    if betas is not None and betas is not AUTO and not (
            isinstance(betas, list) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise checks.fail(spec, "params.betas", "not two numbers in [0, 1)", value=betas,
                          allowed='[beta1, beta2] with 0 <= beta < 1, or "auto"')


def _refusal(spec: Any, written: str) -> Exception:
    """A ``type`` neither DeepSpeed nor torch.optim knows (REFUSED ones are the table's): a misspelling."""
    by_case = {name.lower(): name for name in allowed_types()}  # torch.optim names are case-sensitive
    close = [by_case[written.lower()]] if written.lower() in by_case else \
        difflib.get_close_matches(written, allowed_types(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return checks.fail(spec, "type", f"not an optimizer hf_zero builds{hint}", value=written,
                       allowed=", ".join(allowed_types()))
