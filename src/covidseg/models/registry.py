"""The named variants of the network (report Tables 2 and 3) and :func:`create_model`.

A variant name decides the *switches* (``spatial_dims``, ``fv``, ``paspp``, ``deep_supervision``); the other
fields of :class:`~covidseg.config.ModelConfig` (widths, depth, channels, poolings, SE reduction) are taken from
the config as they are. The name ``custom`` takes the switches from the config too. A switch that differs both
from the ModelConfig default and from the named variant is a contradiction and raises
:class:`~covidseg.errors.ConfigError` (e.g. ``model.name=unet`` with ``model.fv=ce``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from covidseg.config import ModelConfig
from covidseg.errors import ConfigError
from covidseg.models.unet import UNet

SWITCHES = ("spatial_dims", "fv", "paspp", "deep_supervision")
"""The ModelConfig fields a variant name decides."""

CUSTOM = "custom"
"""The variant name whose switches come from the config fields."""

_3D: dict[str, dict[str, Any]] = {
    "unet": {"fv": "none", "paspp": False, "deep_supervision": False},
    "unet-fv-se": {"fv": "se", "paspp": False, "deep_supervision": False},
    "unet-fv-ce": {"fv": "ce", "paspp": False, "deep_supervision": False},
    "unet-fv-paspp": {"fv": "se", "paspp": True, "deep_supervision": False},
    "unet-fv-ce-paspp": {"fv": "ce", "paspp": True, "deep_supervision": False},
    "unet-fv-paspp-ds": {"fv": "se", "paspp": True, "deep_supervision": True},
    "unet-fv-ce-paspp-ds": {"fv": "ce", "paspp": True, "deep_supervision": True},
}

MODELS: dict[str, dict[str, Any]] = {
    **{name: {"spatial_dims": 3, **switches} for name, switches in _3D.items()},
    **{f"{name}-2d": {"spatial_dims": 2, **switches} for name, switches in _3D.items()},
}
"""Variant name -> switches. ``unet-fv-*`` without ``ce`` use the SE channel branch (the report found SE better,
Table 2); ``unet-fv-paspp-ds`` is the report's final model (Table 3, last row). ``*-2d`` are the 2D twins."""

DESCRIPTIONS: dict[str, str] = {
    "unet": "plain U-Net (Table 3, row 1)",
    "unet-fv-se": "U-Net + FV, SE channel branch (Tables 2 and 3)",
    "unet-fv-ce": "U-Net + FV, CE channel branch (Table 2)",
    "unet-fv-paspp": "U-Net + FV(SE) + PASPP (Table 3)",
    "unet-fv-ce-paspp": "U-Net + FV(CE) + PASPP",
    "unet-fv-paspp-ds": "U-Net + FV(SE) + PASPP + deep supervision (the report's final model)",
    "unet-fv-ce-paspp-ds": "U-Net + FV(CE) + PASPP + deep supervision",
}


def describe(name: str) -> str:
    """One line describing a variant."""
    base = name.removesuffix("-2d")
    text = DESCRIPTIONS.get(base, name)
    return f"{text}, 2D twin" if name.endswith("-2d") else text


def _unknown(name: str) -> ConfigError:
    return ConfigError(
        f"model.name {name!r} is not a known variant; valid names: {', '.join([*MODELS, CUSTOM])}"
    )


def variant_config(name: str, **fields: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a named variant, with other fields (``base_width=8``...) set as given."""
    if name != CUSTOM and name not in MODELS:
        raise _unknown(name)
    switches = MODELS.get(name, {})
    try:
        return ModelConfig(**{"name": name, **fields, **switches})
    except TypeError as exc:
        raise ConfigError(f"variant_config({name!r}): {exc}") from None


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Apply the variant's switches to ``cfg`` (a copy), checking for contradictions.

    Raises:
        ConfigError: unknown name, or a switch set to a value that contradicts the name.
    """
    if cfg.name == CUSTOM:
        return dataclasses.replace(cfg)
    if cfg.name not in MODELS:
        raise _unknown(cfg.name)
    switches = MODELS[cfg.name]
    defaults = ModelConfig()
    for key, value in switches.items():
        given = getattr(cfg, key)
        if given != value and given != getattr(defaults, key):
            raise ConfigError(
                f"model.{key}={given!r} contradicts model.name={cfg.name!r} (which has {key}={value!r}); "
                f"pick the variant that has it ({', '.join(MODELS)}) or set model.name=custom"
            )
    return dataclasses.replace(cfg, **switches)


def create_model(cfg: ModelConfig) -> UNet:
    """Build the network a :class:`ModelConfig` describes (its name's switches, then its other fields).

    Example:
        >>> model = create_model(variant_config("unet-fv-paspp-ds", base_width=8))
    """
    return UNet(resolve_model_config(cfg))
