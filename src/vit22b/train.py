"""The training loop: jitted step, evaluation, checkpoints, metrics, resume.

    cfg = TrainConfig(model=preset("nano/4", image_size=16, in_channels=1, num_classes=10),
                      optim=OptimConfig(...), workdir="runs/x")
    result = train(cfg)          # {'eval_accuracy': ..., 'steps': ..., 'seconds': ...}

The batch at step s depends only on (seed, s) (see data.py) and the step is deterministic, so a
run killed at any point and restarted in the same work dir ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from vit22b.checkpoint import Checkpointer, abstract_like
from vit22b.config import ConfigError, ModelConfig
from vit22b.data import ImageDataset, augment_mode, load_dataset
from vit22b.interrupt import StopSignals, TrainingInterrupted, agreed_stop
from vit22b.metrics import MetricsWriter
from vit22b.model import apply
from vit22b.objectives import (
    Loss,
    LossFn,
    Teacher,
    classification_objective,
    distill_objective,
    load_teacher,
    resize_images,
    teacher_config,
)
from vit22b.optim import OptimConfig, learning_rate_schedule
from vit22b.sharding import (
    batch_sharding,
    check_divisibility,
    make_mesh,
)
from vit22b.train_state import State, init_state, planned_remat
from vit22b.weights import CONFIG_FILE, save_model
from vit22b.workdir import TRAIN_CONFIG_FILE, WorkdirError, check_resumable, lock_workdir


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    workdir: str = "workdirs/digits"
    data: str = "digits"
    val_data: str | None = None
    val_fraction: float = 0.2
    batch_size: int = 128  # global batch, over all processes
    mesh: str = "-1x1"  # DATAxMODEL over all devices; -1 fills (sharding.py)
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    loss: Loss = "sigmoid"  # JFT-style multi-label sigmoid cross-entropy, as the paper
    label_smoothing: float = 0.0  # targets (1 - e) * onehot + e / classes
    holdout: str = "test"  # idx data sets: "test" split, or "train" (val_fraction of the train images)
    augment: str = "crop_flip"  # data.AUGMENTATIONS ("flip", "none"); True/False are taken too
    data_workers: int | None = None  # decoding processes for streamed data; None: data.default_workers()
    seed: int = 0
    log_every: int = 50
    log_attention_logits: bool = False  # metrics: train/attn_logit_max/<layer> (the QK-norm claim)
    eval_every: int | None = None  # None: every 10% of the steps; 0: only at the end
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    progress: bool = True
    # A model dir or .safetensors whose weights start the run (fine-tuning, or training an imported
    # model on a mesh): the learned posemb is resampled to the model's grid, and the classifier is
    # kept when its shape matches, else a new zero head. The checkpoints of the work dir still win
    # on resume.
    init_from: str | None = None
    # Distillation (`vit22b distill`): a model dir whose logits on the same augmented view are the
    # targets. The teacher is a frozen input of the step, sharded by the same rule table as the
    # student, forward only (no gradients, no optimizer state), its matmuls in `teacher_dtype`; a
    # teacher of another resolution sees the batch resized to its own.
    teacher: str | None = None
    distill_temperature: float = 1.0
    distill_label_weight: float = 0.0  # a in (1 - a) * KL_t + a * CE(labels)
    teacher_dtype: str = "bfloat16"

    @property
    def eval_interval(self) -> int:
        """Steps between evaluations (0: only at the end); by default a tenth of the run, so the
        accuracy is a curve."""
        return math.ceil(self.steps / 10) if self.eval_every is None else self.eval_every

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", augment_mode(self.augment))
        for name in ("grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} "
                                 f"(--{name.replace('_', '-')})")
        if self.eval_every is not None and self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only at the end), got {self.eval_every}")
        if self.batch_size <= 0 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch size {self.batch_size} must be positive and divisible by "
                             f"grad_accum {self.grad_accum}")
        if self.loss not in Loss.__args__:
            raise ValueError(f"loss {self.loss!r}: choose one of {Loss.__args__}")
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distillation temperature must be positive, got {self.distill_temperature}")
        if not 0 <= self.distill_label_weight <= 1:
            raise ValueError(f"distillation label weight must be in [0, 1], got {self.distill_label_weight}")


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, cfg: TrainConfig,
                    shardings: Any = None, mesh: Mesh | None = None, *, loss_fn: LossFn | None = None,
                    frozen_shardings: Any = None) -> Any:
    """The jitted step `(state, batch[, frozen]) -> (state, metrics)`, the state donated. `loss_fn`:
    the objective (default: classification with cfg.loss); `frozen_shardings`: where the frozen
    input (a teacher's params) lives, when the objective takes one."""
    loss_fn = loss_fn or classification_objective(graphdef, cfg.loss, cfg.label_smoothing,
                                                  attn_stats=cfg.log_attention_logits)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: State, batch: dict[str, jax.Array], frozen: Any = None
             ) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        if cfg.grad_accum == 1:
            (loss, aux), grads = grad_fn(params, batch, frozen)
        else:  # sum gradients of micro-batches in a scan: activation memory of one micro-batch
            micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(carry: Any, mb: dict[str, jax.Array]) -> tuple[Any, None]:
                (loss, aux), grads = grad_fn(params, mb, frozen)
                return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

            first = jax.tree.map(lambda x: x[0], micro)
            _, aux_shape = jax.eval_shape(lambda: grad_fn(params, first, frozen)[0])
            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, aux_shape),
                     jax.tree.map(jnp.zeros_like, params))
            (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro)
            loss, aux, grads = jax.tree.map(lambda x: x / cfg.grad_accum, (loss, aux, grads))
        grad_norm = optax.tree.norm(grads)
        # A non-finite gradient is zeroed so no NaN enters the state, and the host stops the run on
        # seeing `finite` false before it saves anything (a select over the whole state instead
        # would keep two copies of it alive: 7.6 GiB per device for 22B on a 4x4 mesh).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "param_norm": optax.tree.norm(new_params), **aux}
        return new, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_in = {"image": batch_sharding(mesh, 4), "label": batch_sharding(mesh, 1)}
    if frozen_shardings is None:
        jitted = jax.jit(lambda state, batch: step(state, batch), donate_argnums=(0,),
                         in_shardings=(shardings, batch_in), out_shardings=(shardings, replicated))
    else:
        jitted = jax.jit(step, donate_argnums=(0,), in_shardings=(shardings, batch_in, frozen_shardings),
                         out_shardings=(shardings, replicated))

    def run(state: State, batch: dict[str, Any], frozen: Any = None
            ) -> tuple[State, dict[str, jax.Array]]:
        with jax.set_mesh(mesh):
            batch = to_global(batch, mesh)
            return jitted(state, batch) if frozen_shardings is None else jitted(state, batch, frozen)

    run.jitted = jitted  # type: ignore[attr-defined]
    return run


def to_global(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's share of the global batch -> global arrays sharded over `data`."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


def make_predict(graphdef: Any, mesh: Mesh | None = None, image_size: int | None = None) -> Any:
    """Logits of a batch; `image_size`: the model's, when the data come at another (a teacher)."""
    def logits(params: Any, images: jax.Array) -> jax.Array:
        return apply(graphdef, params, resize_images(images, image_size or images.shape[1]))[0]

    jitted = jax.jit(logits)
    if mesh is None:
        return jitted

    def predict(params: Any, images: np.ndarray) -> np.ndarray:
        """Every process passes the same full batch; each feeds its slice, all get all logits."""
        n, i = jax.process_count(), jax.process_index()
        local = images[i * len(images) // n:(i + 1) * len(images) // n]
        with jax.set_mesh(mesh):
            logits = jitted(params, to_global({"image": local}, mesh)["image"])
        return np.asarray(multihost_utils.process_allgather(logits, tiled=True))

    return predict


def evaluate(predict: Any, params: Any, dataset: ImageDataset, batch_size: int) -> float:
    """Top-1 accuracy over the val split (examples whose file fails to decode are left out)."""
    correct = total = 0
    for batch in dataset.eval_batches(batch_size):
        logits = np.asarray(predict(params, batch["image"]))
        mask = batch["mask"]
        correct += int(((logits.argmax(-1) == batch["label"]) & mask).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


def _check_run(cfg: TrainConfig, dataset: ImageDataset, workdir: Path) -> None:
    """Everything that can refuse the run, checked before the work dir is created or written."""
    if cfg.batch_size > dataset.train_size:
        raise TrainingError(f"batch size {cfg.batch_size} exceeds the {dataset.train_size} training "
                            f"images of {dataset.name!r}: use --batch-size {dataset.train_size} or less")
    try:
        check_resumable(workdir, cfg.model, dataclasses.asdict(cfg.optim))
    except WorkdirError as e:
        raise TrainingError(str(e)) from None


def _write_run_files(cfg: TrainConfig, workdir: Path, class_names: tuple[str, ...]) -> None:
    (workdir / CONFIG_FILE).write_text(cfg.model.to_json())
    (workdir / TRAIN_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (workdir / "classes.json").write_text(json.dumps(list(class_names)))


def train(cfg: TrainConfig, dataset: ImageDataset | None = None) -> dict[str, Any]:
    """Train (or resume) in cfg.workdir; returns and writes `final.json`."""
    t_start = time.time()
    workdir = Path(cfg.workdir)
    if dataset is None:
        dataset = load_dataset(cfg.data, cfg.model.image_size, val_path=cfg.val_data,
                               val_fraction=cfg.val_fraction, seed=cfg.seed, holdout=cfg.holdout)
    m = cfg.model
    if (m.num_classes, m.in_channels, m.image_size) != (dataset.num_classes, dataset.in_channels,
                                                         dataset.image_size):
        raise TrainingError(
            f"model (classes {m.num_classes}, channels {m.in_channels}, size {m.image_size}) does "
            f"not fit the data (classes {dataset.num_classes}, channels {dataset.in_channels}, size "
            f"{dataset.image_size}): build the model config from the data set")
    lead = jax.process_index() == 0  # the process that writes metrics, weights and results
    mesh = make_mesh(cfg.mesh)
    check_divisibility(cfg.model, cfg.batch_size, mesh)
    if cfg.teacher:
        try:
            check_divisibility(teacher_config(cfg.teacher, cfg.model, cfg.teacher_dtype), cfg.batch_size,
                               mesh)
        except ConfigError as e:
            raise ConfigError(f"the teacher: {e}") from None
    if cfg.batch_size % jax.process_count():
        raise TrainingError(f"batch {cfg.batch_size} does not split over {jax.process_count()} "
                            "processes: use a multiple of the process count")
    _check_run(cfg, dataset, workdir)
    if cfg.model.remat == "auto":
        cfg = planned_remat(cfg, mesh)
        if lead:
            print(f"remat auto -> {cfg.model.remat} (the planner's choice for this platform, batch "
                  "and memory)", flush=True)
    lock = lock_workdir(workdir)  # refuses if another run holds the work dir; creates it if new
    try:
        checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints, lead=lead)
        graphdef, tx, state, shardings = init_state(cfg, mesh, abstract=True)
        restored = checkpointer.restore_latest(abstract_like(state))
        if restored is None:
            graphdef, tx, state, shardings = init_state(cfg, mesh)
        else:
            state = restored[1]
            print(f"resumed from {workdir}/checkpoints/{restored[0]}", flush=True)
        teacher = (load_teacher(cfg.teacher, cfg.model, cfg.teacher_dtype, mesh) if cfg.teacher
                   else None)
        if lead:  # only now: a refused or failed resume leaves the work dir's files as they were
            _write_run_files(cfg, workdir, dataset.class_names)
        return _train_loop(cfg, dataset, workdir, mesh, checkpointer, graphdef, tx, state, shardings,
                           t_start, teacher)
    finally:
        if lock is not None:
            lock.release()


def _train_loop(cfg: TrainConfig, dataset: ImageDataset, workdir: Path, mesh: Mesh,
                checkpointer: Checkpointer, graphdef: Any, tx: optax.GradientTransformation,
                state: State, shardings: Any, t_start: float, teacher: Teacher | None = None
                ) -> dict[str, Any]:
    lead = jax.process_index() == 0
    start = int(state["step"])
    if teacher is None:
        train_step = make_train_step(graphdef, tx, cfg, shardings, mesh)
    else:
        objective = distill_objective(graphdef, teacher.graphdef, teacher.config.image_size, loss=cfg.loss,
                                      label_smoothing=cfg.label_smoothing,
                                      temperature=cfg.distill_temperature,
                                      label_weight=cfg.distill_label_weight)
        step_fn = make_train_step(graphdef, tx, cfg, shardings, mesh, loss_fn=objective,
                                  frozen_shardings=teacher.shardings)

        def train_step(state: State, batch: dict[str, Any]) -> tuple[State, dict[str, jax.Array]]:
            return step_fn(state, batch, teacher.params)
    predict = make_predict(graphdef, mesh)
    schedule = learning_rate_schedule(cfg.optim, cfg.steps)
    writer = MetricsWriter(workdir, enabled=lead)

    batches = dataset.train_batches(cfg.batch_size // jax.process_count(), seed=cfg.seed,
                                    start_step=start, augment=cfg.augment,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(), workers=cfg.data_workers)
    skipped_indices: set[int] = set()  # train examples whose file failed to decode (replaced)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and lead), unit="step",
               dynamic_ncols=True)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window_start, window_steps, window_wait = time.time(), 0, 0.0
    step = start

    def say(message: str) -> None:
        """One line from the lead process, above the progress bar if there is one."""
        if lead:
            if cfg.progress:
                tqdm.write(message)
            else:
                print(message, flush=True)

    def flush_metrics(log: bool = False) -> None:
        """Fetch the queued per-step metrics (one host sync), stop on a non-finite step; `log`:
        also print them when there is no progress bar to show them."""
        nonlocal window_start, window_steps, window_wait
        if not pending:
            return
        fetched = jax.device_get([mt for _, mt in pending])
        for (s, _), mt in zip(pending, fetched, strict=True):
            if not mt["finite"]:
                raise TrainingError(
                    f"non-finite loss/gradient at step {s + 1} (loss {mt['loss']}): training "
                    f"stopped without saving; the last good checkpoint is step "
                    f"{checkpointer.latest_step()}. Lower --lr, raise --warmup, or check the data.")
        elapsed = time.time() - window_start
        img_s = window_steps * cfg.batch_size / max(elapsed, 1e-9)
        wait_ms = 1000 * window_wait / max(window_steps, 1)
        last_step, last = pending[-1][0] + 1, fetched[-1]
        lr = float(schedule(last_step - 1))
        extra = {f"train/{k}": v for k, v in last.items() if k not in ("loss", "finite")}
        writer.write(last_step, **{"train/loss": last["loss"], **extra, "train/lr": lr,
                                   "train/images_per_second": img_s, "train/data_wait_ms": wait_ms,
                                   "data/skipped_files": dataset.skipped + len(skipped_indices)})
        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{img_s:.0f}", data_ms=f"{wait_ms:.1f}")
        if log and not cfg.progress:
            say(f"step {last_step}/{cfg.steps}: loss {last['loss']:.4f}, lr {lr:.2e}, {img_s:.0f} img/s, "
                f"data wait {wait_ms:.1f} ms")
        pending.clear()
        window_start, window_steps, window_wait = time.time(), 0, 0.0

    def close() -> None:
        bar.close()
        checkpointer.close()
        writer.close()

    with StopSignals() as signals:  # Ctrl-C / SIGTERM: finish the step, save, stop (interrupt.py)
        try:
            while step < cfg.steps:
                t_wait = time.perf_counter()
                batch = next(batches)
                window_wait += time.perf_counter() - t_wait
                skipped = batch.pop("skipped_index", None)
                if skipped is not None:
                    skipped_indices.update(int(i) for i in skipped[skipped >= 0])
                state, metrics = train_step(state, batch)
                pending.append((step, metrics))
                step += 1
                window_steps += 1
                bar.update(1)
                if step == start + 1:  # keep compilation out of the img/s figure
                    jax.block_until_ready(metrics)
                    window_start, window_steps, window_wait = time.time(), 0, 0.0
                if step % cfg.log_every == 0 or step == cfg.steps:
                    flush_metrics(log=True)
                if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps:
                    flush_metrics()
                    accuracy = evaluate(predict, state["params"], dataset, cfg.batch_size)
                    writer.write(step, **{"eval/accuracy": accuracy,
                                          "eval/train_seconds": time.time() - t_start})
                    say(f"step {step}/{cfg.steps}: eval accuracy {100 * accuracy:.2f}%")
                    window_start = time.time()
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    flush_metrics()
                    checkpointer.save(step, state)
                    say(f"step {step}/{cfg.steps}: checkpoint -> {checkpointer.directory / str(step)}")
                signum = agreed_stop(signals, step % cfg.log_every == 0)
                if signum is not None:
                    flush_metrics()  # raises (and nothing is saved) if a queued step was non-finite
                    checkpointer.save(step, state)
                    close()
                    message = (f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint "
                               f"{step} saved in {checkpointer.directory}; run the same command to resume")
                    say(message)
                    raise TrainingInterrupted(signum, message)
        except TrainingError:
            close()
            raise
        finally:
            batches.close()  # stops the decoding workers, if any
    bar.close()
    checkpointer.close()

    accuracy = evaluate(predict, state["params"], dataset, cfg.batch_size)
    writer.write(step, **{"eval/accuracy": accuracy, "eval/train_seconds": time.time() - t_start})
    writer.close()
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    if lead:
        save_model(workdir, params, cfg.model)
    result = {"eval_accuracy": accuracy, "steps": step, "seconds": time.time() - t_start,
              "resumed_from": start or None, "eval_examples": dataset.val_size,
              "train_examples": dataset.train_size, "data": dataset.name,
              "batch_size": cfg.batch_size, "skipped_files": dataset.skipped + len(skipped_indices)}
    if teacher is not None:
        result["teacher_eval_accuracy"] = evaluate(
            make_predict(teacher.graphdef, mesh, teacher.config.image_size), teacher.params, dataset,
            cfg.batch_size)
    if lead:
        (workdir / "final.json").write_text(json.dumps(result, indent=2))
    return result
