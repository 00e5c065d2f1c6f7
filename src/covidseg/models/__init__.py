"""The network family of docs/method.md: blocks, the U-Net, the registry of named variants."""

from covidseg.models.heads import heads_off, set_heads
from covidseg.models.registry import MODELS, create_model, resolve_model_config, variant_config
from covidseg.models.shapes import check_fits, size_divisor
from covidseg.models.unet import UNet

__all__ = [
    "MODELS", "UNet", "check_fits", "create_model", "heads_off", "resolve_model_config", "set_heads", "size_divisor",
    "variant_config",
]
