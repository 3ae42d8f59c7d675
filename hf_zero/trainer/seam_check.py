"""Finding the methods the Trainer seams replace, and checking they still take what ours take.

Why: seams.py replaces private transformers methods. A transformers release may move one to a
mixin, rename it, or change its parameters; the seam must then fail at ``install()`` naming the
method and the transformers versions hf_zero supports, not with a ``KeyError`` or a wrapper that
drops an argument. Methods are looked up along the MRO (``inspect.getattr_static``), so one
inherited from a mixin is found, and a classmethod stays one.

Signature rule (``signature_mismatch``): the wrapper's parameters before its first ``*args`` /
``**kwargs`` are the original's first ones, same names, kinds and defaults (annotations aside).
A wrapper without ``**kwargs`` must then end where the original does; one with ``**kwargs`` only
may leave out keyword-only parameters, one with both may leave out anything (it passes it on).
"""

from __future__ import annotations

import inspect
import warnings

import transformers

from hf_zero.first_rank import is_first_rank

# The transformers versions hf_zero's seams are written against (pyproject.toml's dependency;
# tests/trainer/test_seam_signatures.py keeps the two equal).
SUPPORTED_TRANSFORMERS = ">=5.17,<6"


class UnsupportedTransformersError(TypeError):
    """The installed transformers lacks a method hf_zero wraps (or takes other parameters)."""


def original_of(cls: type, wrapper) -> object:
    """``cls``'s method that ``wrapper`` replaces (its raw attribute: a function or classmethod),
    looked up along the MRO; warns when its parameters differ from the wrapper's."""
    name = wrapper.__name__
    try:
        original = inspect.getattr_static(cls, name)
    except AttributeError:
        raise UnsupportedTransformersError(
            f"hf_zero wraps {cls.__name__}.{name}, which transformers {transformers.__version__} does not have; "
            f"hf_zero supports transformers{SUPPORTED_TRANSFORMERS}: install a version in that range"
        ) from None
    mismatch = signature_mismatch(wrapper, original)
    if mismatch is not None and is_first_rank():  # every rank installs the seams: said once per job
        warnings.warn(f"hf_zero's seam for {cls.__name__}.{name} does not match transformers "
                      f"{transformers.__version__} ({mismatch}); hf_zero supports transformers{SUPPORTED_TRANSFORMERS}",
                      stacklevel=3)
    return original


def signature_mismatch(wrapper, original) -> str | None:
    """How ``wrapper``'s parameters fail to cover ``original``'s (the rule above), or None."""
    fn = original.__func__ if isinstance(original, (classmethod, staticmethod)) else original
    want = list(inspect.signature(fn, follow_wrapped=False).parameters.values())
    got = list(inspect.signature(wrapper, follow_wrapped=False).parameters.values())
    first_var = next((i for i, p in enumerate(got) if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)), len(got))
    for i, p in enumerate(got[:first_var]):
        if i >= len(want):
            return f"takes {p.name!r}, which the original does not"
        q = want[i]
        if (p.name, p.kind, p.default) != (q.name, q.kind, q.default):
            return f"parameter {i} is {_show(p)}, the original's {_show(q)}"
    rest = want[first_var:]
    kinds = {p.kind for p in got[first_var:]}
    if inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds:
        return None
    if inspect.Parameter.VAR_KEYWORD in kinds:
        left = [p.name for p in rest if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
        return None if not left else f"does not take {left} (positional in the original)"
    return None if not rest else f"does not take {[p.name for p in rest]}"


def _show(p: inspect.Parameter) -> str:
    default = "" if p.default is p.empty else f"={p.default!r}"
    star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    return f"{star}{p.name}{default}"
