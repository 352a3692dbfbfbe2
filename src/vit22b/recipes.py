"""Training recipes per data set: what `vit22b train --data NAME` does when a flag is not given.

A recipe is data, not a code path: the CLI (and `train_config_for` from Python) fills every flag
left unset from the data set's recipe, so `vit22b train --data fashion-mnist` and
`train(train_config_for("fashion-mnist"))` run the same thing. The paper's own recipe (Adafactor,
rsqrt with 10k/177k warm-up and 30k/177k cool-down, sigmoid loss, head weight decay x100) is the
default for data sets without a recipe of their own; the small-data recipes below depart from it
where a search on a held-out part of the training images said so (README: "Real data").
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vit22b.config import ConfigError, ModelConfig, preset
from vit22b.data import CLASS_FILTER, ImageDataset, base_source
from vit22b.optim import OptimConfig

if TYPE_CHECKING:
    from vit22b.train import TrainConfig


PLATFORM = "platform"  # a recipe's dtype_mm: resolved by platform_matmul_dtype() when a run starts


def platform_matmul_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """"bfloat16" where matmuls in it are fast (any accelerator; a CPU with the AVX-512 BF16 or
    AMX-BF16 instructions), else "float32": XLA's CPU backend emulates bfloat16 dots on the other
    CPUs, slower than float32 ones (bench/README.md)."""
    import jax

    if jax.default_backend() != "cpu":
        return "bfloat16"
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "float32"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


@dataclasses.dataclass(frozen=True)
class Recipe:
    preset: str = "Ti/16"
    image_size: int | None = None  # None: the data set's native size (folders: 224)
    steps: int = 10_000
    batch_size: int = 128
    optimizer: str = "adafactor"
    learning_rate: float = 1e-3
    schedule: str = "rsqrt"
    warmup_fraction: float = 10 / 177  # the paper's 10k warm-up steps of 177k
    cooldown_fraction: float = 30 / 177  # rsqrt only
    weight_decay: float = 0.03
    head_wd_mult: float = 100.0
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    augment: str = "crop_flip"  # data.AUGMENTATIONS
    model: tuple[tuple[str, Any], ...] = ()  # ModelConfig overrides, e.g. (("dtype_mm", "float32"),)


RECIPES: dict[str, Recipe] = {
    # The README's first command: seconds per hundred steps on 2 cores, ~99% held out.
    "digits": Recipe(preset="nano/4", image_size=16, steps=1500, learning_rate=3e-3),
    # Chosen on 6,000 of the 60,000 training images (README: "Real data"): 128 wide, 6 deep, 7x7
    # patches (16 tokens), no augmentation (5 epochs are too few for translations to pay); 2,400
    # steps of 128, evaluations included, fit in 15 minutes on 2 CPU cores. Matmuls in the
    # platform's fast dtype: bfloat16 on accelerators and on CPUs that multiply it natively
    # (AVX-512 BF16 / AMX: the same accuracy in 8-9.5 minutes, README), float32 on the others, where
    # bfloat16 matmuls run slower than float32.
    "fashion-mnist": Recipe(
        preset="nano/7", image_size=28, steps=2400, optimizer="adamw", learning_rate=2e-3,
        schedule="cosine", warmup_fraction=0.05, weight_decay=0.05, head_wd_mult=1.0, loss="softmax",
        label_smoothing=0.1, augment="none",
        model=(("width", 128), ("depth", 6), ("mlp_dim", 512), ("num_heads", 4), ("dtype_mm", PLATFORM),
               ("remat", "nothing_saveable"))),  # as measured (README); auto's dots_saveable did no better
}
DEFAULT_RECIPE = Recipe()


def effective_default(field: str) -> str:
    """What a run gets for a Recipe field when its flag is not given, per data set: the flags'
    help text, generated here so that it cannot drift from the recipes."""
    def show(value: Any) -> str:
        if value is None:
            return "the data's native size (folders 224)"
        if field.endswith("_fraction"):
            return f"{value:.1%} of the steps"
        return f"{value:g}" if isinstance(value, float) else str(value)

    other = getattr(DEFAULT_RECIPE, field)
    parts = [f"{name}: {show(getattr(r, field))}" for name, r in RECIPES.items()
             if getattr(r, field) != other]
    return "; ".join(parts + [f"{'else' if parts else 'all data'}: {show(other)}"])


def recipe_for(data: str) -> Recipe:
    """The recipe of the data set `data` names (a class filter does not change it)."""
    return RECIPES.get(base_source(data), DEFAULT_RECIPE)


def _class_suffix(data: str) -> str:
    """"fashion-mnist:classes=0-6" -> "-classes-0-6": a class subset trains in a work dir of its own."""
    spec = data.split(CLASS_FILTER, 1)[1] if CLASS_FILTER in data else ""
    return f"-classes-{spec.replace(',', '_')}" if spec else ""


def model_config_for(recipe: Recipe, dataset: ImageDataset, preset_name: str | None = None,
                     **overrides: Any) -> ModelConfig:
    """The recipe's model (or `preset_name`) shaped to the data set, with flag overrides on top."""
    fields = dict(recipe.model) | overrides
    if fields.get("dtype_mm") == PLATFORM:
        fields["dtype_mm"] = platform_matmul_dtype()
    if recipe.loss == "sigmoid" and "head_bias_init" not in fields:  # start near the label prior
        fields["head_bias_init"] = -math.log(max(dataset.num_classes - 1, 1))
    return preset(preset_name or recipe.preset, image_size=dataset.image_size,
                  in_channels=dataset.in_channels, num_classes=dataset.num_classes, **fields)


def optim_config_for(recipe: Recipe, steps: int, **overrides: Any) -> OptimConfig:
    """The recipe's optimiser for a run of `steps`; warm-up/cool-down scale with the run length."""
    warmup = overrides.pop("warmup_steps", None)
    warmup = round(steps * recipe.warmup_fraction) if warmup is None else warmup
    cooldown = overrides.pop("cooldown_steps", None)
    timescale = overrides.pop("timescale", None)
    fields = dict(optimizer=recipe.optimizer, learning_rate=recipe.learning_rate, schedule=recipe.schedule,
                  warmup_steps=warmup, weight_decay=recipe.weight_decay, head_wd_mult=recipe.head_wd_mult,
                  cooldown_steps=round(steps * recipe.cooldown_fraction) if cooldown is None else cooldown,
                  timescale=max(warmup, 1) if timescale is None else timescale)
    return OptimConfig(**(fields | overrides))


def train_config_for(dataset: ImageDataset, data: str, *, preset_name: str | None = None,
                     init_from: str | None = None, steps: int | None = None,
                     model: dict[str, Any] | None = None, optim: dict[str, Any] | None = None,
                     **fields: Any) -> TrainConfig:
    """What `vit22b train --data DATA` runs, from Python: every field not given comes from the
    data set's recipe (else the paper's), shaped to `dataset` (loaded by the caller, at the
    recipe's `image_size` unless another is wanted). `model`: ModelConfig overrides (the model
    flags); `optim`: OptimConfig overrides; `fields`: the other TrainConfig fields.

        dataset = load_dataset("fashion-mnist", recipe_for("fashion-mnist").image_size)
        train(train_config_for(dataset, "fashion-mnist"), dataset)
    """
    from vit22b.train import TrainConfig
    from vit22b.weights import read_config

    recipe = recipe_for(data)
    loss = fields.pop("loss", None) or recipe.loss
    shape = dict(image_size=dataset.image_size, in_channels=dataset.in_channels,
                 num_classes=dataset.num_classes)
    if init_from:
        if preset_name:
            raise ConfigError("--init takes the model from the checkpoint: drop --preset (model "
                              "flags such as --remat still apply on top)")
        start = read_config(init_from)
        if start is None:
            raise ConfigError(f"{init_from} carries no vit22b config: import it first (`vit22b import`)")
        model_cfg = start.replace(**shape, **(model or {}))
    else:
        model_cfg = model_config_for(dataclasses.replace(recipe, loss=loss), dataset, preset_name,
                                     **(model or {}))
    steps = recipe.steps if steps is None else steps
    # 'digits', 'fashion-mnist' or the folder's name; a class filter gets its own work dir
    name = Path(base_source(data).removeprefix("idx:")).name + _class_suffix(data)
    defaults = dict(workdir=f"workdirs/{name}", batch_size=recipe.batch_size,
                    label_smoothing=recipe.label_smoothing, augment=recipe.augment)
    given = {k: v for k, v in fields.items() if v is not None}
    return TrainConfig(model=model_cfg, optim=optim_config_for(recipe, steps, **(optim or {})),
                       data=data, steps=steps, loss=loss, init_from=init_from,  # type: ignore[arg-type]
                       **(defaults | given))
