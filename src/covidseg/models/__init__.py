"""The network family of METHOD.md §1: blocks, the U-Net, the registry of named variants."""

from covidseg.models.registry import MODELS, create_model, resolve_model_config, variant_config
from covidseg.models.unet import UNet

__all__ = ["MODELS", "UNet", "create_model", "resolve_model_config", "variant_config"]
