"""What hf_zero says when ``--torch_compile`` cannot compile the model: one clear error, or, where the
user asked torch to run on eagerly, a record of each fallback in the run report.

[Note: compile failures]
torch compiles lazily, at the first forward (and backward) of the first step, so a model, a setting
or a backend it cannot compile fails inside the Trainer's loop. ``watching`` wraps the Trainer's
``train`` and ``evaluation_loop`` (seams.py: a standalone ``evaluate()`` or ``predict()`` compiles at
its first forward too; an evaluation inside ``train`` is watched once, by ``train``'s watch) while
``--torch_compile`` is on:

- by default torch raises (``torch._dynamo.exc.TorchDynamoException``: ``BackendCompilerFailed``
  for a backend that raises, ``Unsupported`` where fullgraph capture meets a break, ...); it is
  raised again as :class:`CompileFailed`, naming the model, the ZeRO stage, the backend and mode,
  torch's cause, and the way on;
- the switch to go on eagerly is torch's own, ``TORCHDYNAMO_SUPPRESS_ERRORS=1``
  (``torch._dynamo.config.suppress_errors``): hf_zero adds no second one. Torch then runs each code
  object it could not compile eagerly and logs "WON'T CONVERT" on ``torch._dynamo.convert_frame``;
  a handler on that logger, attached only for the run, records each as ``<code>: <cause>`` in
  ``session.compile_fallbacks``, which the run report keeps (``ranks[].compile_fallbacks``) and
  its summary counts. Graph breaks are not fallbacks: torch compiles around them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

DOCS = "docs/getting-started.md#compiled-training---torch_compile"
_DYNAMO_LOGGER = "torch._dynamo.convert_frame"  # where torch logs a suppressed compile error
_TORCH_HINT = "Set TORCHDYNAMO_VERBOSE=1"  # torch's own closing advice, dropped from the one-line cause


class CompileFailed(RuntimeError):
    """``--torch_compile`` could not compile the model (the cause: ``__cause__``, torch's exception)."""


def cause(error: BaseException) -> str:
    """torch's reason in one line: its message without the traceback advice, lines joined."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(_TORCH_HINT)]
    text = " ".join(lines) or type(error).__name__
    return f"{type(error).__name__}: {text}"


def explain(error: BaseException, *, model: str, stage: int | None, backend: str | None,
            mode: str | None) -> str:
    """The message of :class:`CompileFailed`."""
    where = f"ZeRO stage {stage}" if stage is not None else "hf_zero"
    setting = f"torch_compile_backend {backend!r}" + (f", torch_compile_mode {mode!r}" if mode else "")
    return (f"--torch_compile could not compile {model} at {where} ({setting}): {cause(error).rstrip('.')}. Train without "
            f"--torch_compile, or with another --torch_compile_backend; to run what torch cannot compile "
            f"eagerly instead, set TORCHDYNAMO_SUPPRESS_ERRORS=1 (each fallback is listed in the run report, "
            f"ranks[].compile_fallbacks). See {DOCS}")


class _Fallbacks(logging.Handler):
    """Records torch's "WON'T CONVERT" warnings (a compile error it suppressed) as ``<code>: <cause>``."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is None or record.exc_info[1] is None:
            return
        head = record.getMessage().splitlines()[0].strip()
        code = head.removeprefix("WON'T CONVERT").strip() or "a compiled region"
        self.into.append(f"{code}: {cause(record.exc_info[1])}")


@contextlib.contextmanager
def watching(trainer: Any, session: Any) -> Iterator[None]:
    """Around the Trainer's ``train`` and ``evaluation_loop`` ([Note: compile failures]); nothing unless
    ``--torch_compile``, nor inside another watch of the same session."""
    args = trainer.args
    if session is None or not getattr(args, "torch_compile", False):
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    logger = logging.getLogger(_DYNAMO_LOGGER)
    if any(isinstance(h, _Fallbacks) and h.into is session.compile_fallbacks for h in logger.handlers):
        yield  # inside a watch already (an evaluation inside train()): that one answers, once
        return
    handler = _Fallbacks(session.compile_fallbacks)
    logger.addHandler(handler)
    try:
        yield
    except TorchDynamoException as error:
        raise CompileFailed(explain(error, model=type(trainer.model).__name__, stage=session.stage, backend=args.torch_compile_backend,
                                    mode=args.torch_compile_mode)) from error
    finally:
        logger.removeHandler(handler)
