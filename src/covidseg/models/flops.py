"""Cost of the variants, measured by :class:`torch.utils.flop_counter.FlopCounterMode` (not estimated by hand).

The counter runs the forward pass on the ``meta`` device (shapes only, no arithmetic), so measuring every variant
at the default width takes well under a second. It counts the matrix-like operations (convolutions, transposed
convolutions, matrix products) at 2 FLOPs per multiply-add; element-wise work (batch norm, ReLU, sigmoid,
additions, pooling, interpolation) is not counted and is a few percent on top.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from covidseg.config import ModelConfig
from covidseg.models.heads import set_heads
from covidseg.models.registry import MODELS, create_model, variant_config

DEFAULT_PATCH: tuple[int, int, int] = (8, 128, 128)
"""The report's training patch, ``(D, H, W)`` = 128x128x8 (report Table 1)."""


@dataclass(frozen=True)
class ModelCost:
    """Size and cost of one variant.

    Attributes:
        name: variant name.
        spatial_dims: 2 or 3.
        params: trainable parameters (as built, deep-supervision heads included when the variant has them).
        flops: FLOPs of one forward pass over ``input_shape`` with deep supervision off (inference).
        input_shape: ``(1, C, *S)`` the pass was measured on.
    """

    name: str
    spatial_dims: int
    params: int
    flops: int
    input_shape: tuple[int, ...]

    @property
    def flops_per_voxel(self) -> float:
        """FLOPs per output voxel (forward pass, heads off)."""
        return self.flops / math.prod(self.input_shape[2:])


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of ``model`` on an input of ``input_shape``, counted on the meta device.

    A model that is not on the meta device is copied there for the count (its weights are not touched).
    """
    params = list(model.parameters()) + list(model.buffers())
    if any(t.device.type != "meta" for t in params):
        model = copy.deepcopy(model).to("meta")
    x = torch.empty(input_shape, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def measure(cfg: ModelConfig, patch: tuple[int, int, int] = DEFAULT_PATCH) -> ModelCost:
    """Parameters and inference FLOPs of the model ``cfg`` describes, on one ``patch`` (``(D, H, W)``; 2D
    models use its ``(H, W)``)."""
    with torch.device("meta"):
        model = create_model(cfg)
    params = count_parameters(model)
    set_heads(model, False)
    spatial = tuple(patch) if model.spatial_dims == 3 else tuple(patch[1:])
    shape = (1, model.config.in_channels, *spatial)
    model.check_input_shape(shape)
    return ModelCost(model.config.name, model.spatial_dims, params, count_flops(model, shape), shape)


def measure_all(
    patch: tuple[int, int, int] = DEFAULT_PATCH, base: ModelConfig | None = None, names: list[str] | None = None
) -> list[ModelCost]:
    """:func:`measure` for every named variant (or ``names``), with ``base``'s non-switch fields."""
    base = base or ModelConfig()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if f.name not in ("name", "spatial_dims", "fv", "paspp", "deep_supervision")}
    return [measure(variant_config(name, **fields), patch) for name in (names or list(MODELS))]
