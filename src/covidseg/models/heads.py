"""Deep supervision as an explicit switch: :func:`set_heads` and the :func:`heads_off` block.

A :class:`~covidseg.models.UNet` built with ``deep_supervision`` returns a list ``[final, level 1, ...]`` while its
heads are on and one tensor while they are off (nnU-Net's contract, never ``self.training``). Training switches
them on; validation, ``segment``, exports and FLOP counts switch them off, always through these two functions,
which also reach the model inside DDP / ``torch.compile`` wrappers and accept exported models (their switch only
goes off) and plain modules (no heads: nothing to switch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def heads_on(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) currently returns its deep-supervision heads."""
    return bool(getattr(unwrap_model(model), "deep_supervision", False))


def set_heads(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the deep-supervision heads of ``model`` on or off; returns the bare (unwrapped) model.

    Raises:
        ConfigError: switching on the heads of a model built without them (or of an exported model).
    """
    bare = unwrap_model(model)
    switch = getattr(bare, "set_deep_supervision", None)
    if callable(switch):
        switch(bool(enabled))
    elif enabled:
        from covidseg.errors import ConfigError

        raise ConfigError(f"{type(bare).__name__} has no deep-supervision heads to switch on")
    return bare


@contextlib.contextmanager
def heads_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the bare ``model`` returns one tensor and is in eval mode; the heads and the train/eval
    state it had are restored afterwards (also on errors). Yields the bare model."""
    bare = unwrap_model(model)
    had_heads, was_training = heads_on(bare), bare.training
    set_heads(bare, False)
    bare.eval()
    try:
        yield bare
    finally:
        if had_heads:
            set_heads(bare, True)
        bare.train(was_training)


__all__ = ["heads_off", "heads_on", "set_heads", "unwrap_model"]
