"""Gradient clipping folded into a fused optimizer step.

[Note: clip in the step] Clipping scales every main grad by ``coef = min(1, max_norm / norm)``
before the optimizer reads them: one pass over the grads that reads and writes each fp32 element
(8 bytes an element; 3.3 ms a step for 1.1B params on an H100), just before a step that reads
them again. torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with
``fused=True``, the Trainer's ``adamw_torch_fused``) already divide each grad by a scale as they
read it: their ``step`` takes the optimizer's ``grad_scale`` attribute, the protocol
``torch.amp.GradScaler`` uses to unscale inside the step. With such an optimizer and nothing
else using that protocol (no loss scaler owns the step), the engine sets ``grad_scale = 1 / coef``
for one step instead of multiplying, and removes it after the step (or at ``zero_grad``, when the
step was skipped). Under a ``GradScaler`` (fp16) the scaler keeps an unscaled optimizer's own
``grad_scale``, adds ``found_inf`` and removes both after the step. The parameters and state equal
the multiplied step's up to one rounding of each grad (``g / (1 / coef)`` against ``g * coef``);
where no clipping is needed ``coef`` is 1 and the two are identical. The fused kernels store the
scaled grad back, so the saving is the separate pass's read: 4 of its 8 bytes an element
(session 18's H100 profiles at 1.1B: hf_zero's fused AdamW kernel 13.3 ms, plain compiled's
11.5 ms plus 3.2 ms for its clip pass).

Until the step, the main grads are unclipped. Anything else that reads them in that window (a
second ``clip_grad_norm_`` or ``grad_norm`` of the step, tensor parallel's norm) first has the
engine apply the held coefficient as the multiply it replaced (``apply_pending_clip``), so a second
clip sees clipped grads, as with torch's ``clip_grad_norm_``.

Only the device buckets of an engine without optimizer offload take this path: an offloaded
bucket's grads are scaled by the host step as it reads them (host_step.py), and the host step
drives the device buckets' step itself. Not a patch of torch: the attribute is the one
``GradScaler`` sets, read by torch's own ``step``.
"""

from __future__ import annotations

import torch

_FUSED_SCALING = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def applies(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer``'s own step can take the clip coefficient ([Note: clip in the step]):
    a fused torch optimizer with every group fused, whose ``grad_scale`` / ``found_inf`` nothing
    else has set."""
    return (optimizer is not None and type(optimizer) in _FUSED_SCALING
            and all(g.get("fused") for g in optimizer.param_groups)
            and getattr(optimizer, "grad_scale", None) is None and getattr(optimizer, "found_inf", None) is None)


def start(optimizer: torch.optim.Optimizer, coef: torch.Tensor) -> torch.Tensor:
    """Have ``optimizer``'s next step divide every grad by ``1 / coef``; returns the tensor set."""
    optimizer.grad_scale = torch.reciprocal(coef.to(torch.float32))
    return optimizer.grad_scale


def end(optimizer: torch.optim.Optimizer, scale: torch.Tensor, inside_step: bool) -> None:
    """Undo ``start`` (idempotent; ``scale`` what it returned). Inside a ``GradScaler``'s step (it
    set ``found_inf``) the scaler removes both attributes itself once the step returns, and fails
    if one is gone. Outside a step (``zero_grad``) ours goes whatever is left beside it: a step
    that raised inside the scaler left its attributes behind."""
    if getattr(optimizer, "grad_scale", None) is not scale:
        return  # gone already, or the scaler's own (its product with ours is its to remove)
    if inside_step and getattr(optimizer, "found_inf", None) is not None:
        return
    del optimizer.grad_scale
