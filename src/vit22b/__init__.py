"""vit22b: ViT-22B (Dehghani et al., 2023) in JAX + Flax: the model, its training system and its
transfer suite. The Python API mirrors the `vit22b` command line; see README.md."""

from vit22b.api import (
    export_timm,
    export_weights,
    import_timm,
    import_weights,
    load_model,
    model_from_params,
)
from vit22b.config import PRESETS, ConfigError, ModelConfig, preset
from vit22b.flops import flops_per_image
from vit22b.model import ViT, abstract_model, apply, init_model, split_params
from vit22b.weights import WeightsError, save_model

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "ViT", "WeightsError", "abstract_model", "apply",
           "export_timm", "export_weights", "flops_per_image", "import_timm", "import_weights",
           "init_model", "load_model",
           "model_from_params", "preset", "save_model", "split_params"]
__version__ = "0.1.0"
