"""What a training step minimises: the classification losses, and distillation against a frozen
teacher (its loading and placement on the mesh). `train.make_train_step(loss_fn=...)` takes any
objective `loss_fn(params, batch, frozen) -> (loss, {metric: scalar})`; `frozen` (a teacher's
params, or None) is an input of the step that gets no gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vit22b.config import ModelConfig
from vit22b.model import abstract_model, apply, logical_axes, split_params
from vit22b.sharding import param_shardings

Loss = Literal["sigmoid", "softmax"]
LossFn = Callable[[Any, dict[str, jax.Array], Any], tuple[jax.Array, dict[str, jax.Array]]]


class TeacherError(ValueError):
    """A teacher that cannot distil into this student on this data; the message says why."""


def classification_loss(logits: jax.Array, labels: jax.Array, kind: Loss,
                        label_smoothing: float = 0.0) -> jax.Array:
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    if kind == "softmax":
        return optax.softmax_cross_entropy(logits, onehot).mean()
    # big_vision's sigmoid_xent: sum over classes, mean over the batch.
    return optax.sigmoid_binary_cross_entropy(logits, onehot).sum(-1).mean()


def kl_distill_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
    """big_vision's `dist(kind='kl')`: t^2 * KL(softmax(teacher/t) || softmax(student/t)), summed
    over classes, batch mean; no gradient flows into the teacher."""
    t = temperature
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p = jax.nn.log_softmax(teacher / t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    return t**2 * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def classification_objective(graphdef: Any, loss: Loss, label_smoothing: float = 0.0, *,
                             attn_stats: bool = False) -> LossFn:
    """`attn_stats`: also report each layer's largest attention logit (`attn_logit_max/<layer>`),
    whose growth signals the instability QK norm prevents (ViT-22B section 2; Wortsman et al. 2023)."""
    def loss_fn(params: Any, batch: dict[str, jax.Array], _: Any) -> tuple[jax.Array, dict]:
        logits, out = apply(graphdef, params, batch["image"], attn_stats=attn_stats)
        stats = jax.lax.stop_gradient(out["attn_logit_max"]) if attn_stats else []
        return (classification_loss(logits, batch["label"], loss, label_smoothing),
                {f"attn_logit_max/{i}": stats[i] for i in range(len(stats))})
    return loss_fn


def resize_images(images: jax.Array, size: int) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C] (bilinear, antialiased when shrinking)."""
    if images.shape[1] == size:
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")


def distill_objective(graphdef: Any, teacher_def: Any, teacher_size: int, *, loss: Loss = "softmax",
                      label_smoothing: float = 0.0, temperature: float = 1.0,
                      label_weight: float = 0.0) -> LossFn:
    """(1 - label_weight) KL_t + label_weight CE, teacher and student on the same view of the batch
    (big_vision's "consistent" matching)."""
    def loss_fn(params: Any, batch: dict[str, jax.Array], teacher_params: Any
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits, _ = apply(graphdef, params, batch["image"])
        teacher_logits, _ = apply(teacher_def, teacher_params, resize_images(batch["image"], teacher_size))
        kl = kl_distill_loss(logits, teacher_logits, temperature)
        ce = classification_loss(logits, batch["label"], loss, label_smoothing)
        return (1.0 - label_weight) * kl + label_weight * ce, {"kl": kl, "ce": ce}
    return loss_fn


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen model whose logits are the distillation targets: its config (dtype and execution
    settings as it runs here), graphdef, params placed in `shardings` (or abstract)."""
    config: ModelConfig
    graphdef: Any
    params: Any
    shardings: Any


def teacher_config(location: str | Path, student: ModelConfig, dtype: str) -> ModelConfig:
    """The teacher's architecture (from the header of its weights file), as it runs in the step:
    forward only (no remat), its matmuls in `dtype`; checked against the student."""
    from vit22b.weights import read_config

    teacher = read_config(location)
    if teacher is None:
        raise TeacherError(f"teacher {location} carries no vit22b config: import it first "
                           "(`vit22b import`)")
    if teacher.num_classes != student.num_classes or teacher.in_channels != student.in_channels:
        raise TeacherError(
            f"teacher {location} ({teacher.num_classes} classes, {teacher.in_channels} channels) "
            f"does not fit the data ({student.num_classes} classes, {student.in_channels} channels): "
            "distil on the data the teacher was trained for (fine-tune the teacher first)")
    return teacher.replace(dtype_mm=dtype, remat="none", scan=student.scan,
                           collective_matmul=student.collective_matmul)


def abstract_teacher(teacher: ModelConfig, mesh: Mesh | Any) -> Teacher:
    """The teacher's shapes placed by the student's rule table (nothing allocated): what
    load_teacher fills, and what the planner and abstract compiles use."""
    model = abstract_model(teacher)
    graphdef, expected = split_params(model)
    shardings = param_shardings(logical_axes(model), expected, mesh)
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          expected, shardings)
    return Teacher(teacher, graphdef, params, shardings)


def load_teacher(location: str | Path, student: ModelConfig, dtype: str, mesh: Mesh) -> Teacher:
    """The teacher's params, sharded by the same rule table as the student's: each process
    builds only the slices its devices hold. They stay float32 like the student's (matmuls run in
    `dtype`): bfloat16 storage would halve them, but XLA:CPU upcasts bfloat16 collectives to
    float32 whole-stack, so its memory could not be checked against the planner here."""
    from vit22b.weights import fit_weights, flatten, read_weights, unflatten

    shapes = abstract_teacher(teacher_config(location, student, dtype), mesh)
    flat, _ = read_weights(location)
    fitted = flatten(fit_weights(flat, shapes.params))
    shard = flatten(shapes.shardings)
    params = unflatten({k: jax.make_array_from_callback(v.shape, shard[k], lambda idx, v=v: v[idx])
                        for k, v in fitted.items()})
    return dataclasses.replace(shapes, params=params)
