"""Trainer integration: ``activate(config)`` makes every ``transformers.Trainer`` of this process
use hf_zero. ``python -m hf_zero.run`` and ``hf-zero launch`` call it for ``--zero_config``;
a script of your own can call it before creating its Trainer. One code path under both."""

from __future__ import annotations

from hf_zero.trainer.session import active_config, session_of


def check(config) -> object:
    """Load ``config`` and check this version can run it, without side effects.

    Raises ``hf_zero.config.ConfigError`` for a bad file and ``UnsupportedConfig`` (both a
    ``ConfigError`` and a ``NotImplementedError``) for a combination this version does not run
    (the table in hf_zero/config/unsupported.py; an "auto" precision is refused only for rows that
    apply whatever the Trainer's dtype).
    """
    from hf_zero.config import load_config
    from hf_zero.config.unsupported import refuse
    from hf_zero.engine.stages import check_supported

    loaded = load_config(config)
    check_supported(
        loaded.zero.stage,
        loaded.zero.offload_optimizer.device,
        loaded.zero.offload_param.device if loaded.zero.stage == 3 else "none",
    )
    refuse(loaded)
    return loaded


def activate(config) -> object:
    """Validate ``config`` (a path, a dict or an ``HfZeroConfig``) and turn hf_zero on.

    Raises ``hf_zero.config.ConfigError`` for a bad file and ``NotImplementedError`` for a
    feature this version does not have, before any process group or model exists.
    Returns the loaded (not yet resolved) config.
    """
    from hf_zero.trainer import seams, session

    loaded = check(config)
    session.set_active_config(loaded)
    seams.install()
    return loaded


def deactivate() -> None:
    """Turn hf_zero off for Trainers created from now on."""
    from hf_zero.trainer import seams, session

    session.set_active_config(None)
    seams.uninstall()


__all__ = ["check", "activate", "deactivate", "active_config", "session_of"]
