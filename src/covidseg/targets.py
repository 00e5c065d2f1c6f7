"""What a network is trained to predict: the targets, their output channels and the label values of the masks.

A target names the sigmoid output channels of a model (multi-label, one channel per structure):

===========  ==============================================  =====================================
target       channels                                        trained from
===========  ==============================================  =====================================
infection    infection                                       the infection mask
lung         left lung, right lung                           the lung labels (1 left, 2 right)
joint        left lung, right lung, infection                both
===========  ==============================================  =====================================

Mask labels (docs/architecture.md): lungs 0 background, :data:`LEFT_LUNG` 1, :data:`RIGHT_LUNG` 2; infection 0/1;
the joint mask of the datasets holds :data:`JOINT_INFECTION` 3 for infection.
"""

from __future__ import annotations

import numpy as np

from covidseg.errors import ConfigError, InputError

LEFT_LUNG = 1
"""Label of the left lung in a lung mask."""
RIGHT_LUNG = 2
"""Label of the right lung in a lung mask."""
JOINT_INFECTION = 3
"""Label of infection in a joint (lungs and infection) mask."""

TARGET_CHANNELS: dict[str, tuple[str, ...]] = {
    "infection": ("infection",),
    "lung": ("left lung", "right lung"),
    "joint": ("left lung", "right lung", "infection"),
}
"""Output channels of each target (all sigmoid, multi-label)."""
INFECTION = "infection"
"""Name of the infection channel."""


def target_channels(target: str) -> tuple[str, ...]:
    """Channel names of a target (``infection``, ``lung``, ``joint``).

    Raises:
        ConfigError: an unknown target.
    """
    if target not in TARGET_CHANNELS:
        raise ConfigError(f"target {target!r}: expected one of {', '.join(TARGET_CHANNELS)}")
    return TARGET_CHANNELS[target]


def target_of(out_channels: int) -> str:
    """The one target with ``out_channels`` output channels.

    Raises:
        InputError: no target has that many channels.
    """
    matches = [name for name, channels in TARGET_CHANNELS.items() if len(channels) == int(out_channels)]
    if len(matches) != 1:
        raise InputError(f"a model with {out_channels} output channel(s) fits no target "
                         f"({', '.join(f'{k}: {len(v)}' for k, v in TARGET_CHANNELS.items())})")
    return matches[0]


def infection_channel(target: str) -> int:
    """Which output channel of ``target`` is the infection (0 for ``infection``, 2 for ``joint``).

    Raises:
        InputError: a target without an infection channel (a lung model).
    """
    channels = target_channels(target)
    if INFECTION not in channels:
        raise InputError(f"target {target!r} has no infection channel (channels: {', '.join(channels)})")
    return channels.index(INFECTION)


def make_target(lung: np.ndarray, infection: np.ndarray, target: str) -> np.ndarray:
    """``(K, *S)`` float32 multi-label target from lung labels (1 left, 2 right) and the infection mask.

    Raises:
        ConfigError: an unknown target.
    """
    if target not in TARGET_CHANNELS:
        raise ConfigError(f"train.target: expected one of {', '.join(TARGET_CHANNELS)}, got {target!r}")
    masks = {"left lung": lambda: lung == LEFT_LUNG, "right lung": lambda: lung == RIGHT_LUNG,
             INFECTION: lambda: infection > 0}
    return np.stack([masks[name]() for name in TARGET_CHANNELS[target]]).astype(np.float32)
