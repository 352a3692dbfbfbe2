"""vit22b: ViT-22B (Dehghani et al., 2023) in JAX + Flax: the model, its training system and its
transfer suite. The Python API mirrors the `vit22b` command line; see README.md.

The names below load on first use (PEP 562): data-loading worker processes import `vit22b.data`
and must not pay for importing JAX and Flax (seconds per worker).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_timm": "vit22b.api", "import_timm": "vit22b.api", "load_model": "vit22b.api",
    "export_weights": "vit22b.api", "import_weights": "vit22b.api",
    "model_from_params": "vit22b.api", "PRESETS": "vit22b.config", "ConfigError": "vit22b.config",
    "ModelConfig": "vit22b.config", "preset": "vit22b.config", "flops_per_image": "vit22b.flops",
    "ViT": "vit22b.model", "abstract_model": "vit22b.model", "apply": "vit22b.model",
    "init_model": "vit22b.model", "split_params": "vit22b.model", "WeightsError": "vit22b.weights",
    "save_model": "vit22b.weights",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vit22b' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
