"""`vit22b lit`: locked-image tuning (LiT, Zhai et al. 2022) and zero-shot classification.

Protocol. The image tower is locked: features of every image are computed once from the
checkpoint (`--feature`, `pre_logits` by default, as in `probe`) and standardised with the
training images' mean and std. Only the text tower (`tasks.text`: byte tokenizer + small pre-LN
transformer) is trained from scratch, together with, by default (`--image-head linear`), a learned
linear projection of the frozen features into the joint space - LiT's "locked image, unlocked
head" variant. `--image-head none` is LiT's fully locked "Lu" setting: the standardised feature
itself is the image embedding and the text tower projects into its dimension.

Loss over a batch of B (image, caption) pairs, both sides L2-normalised, z_i . z_t = cosine:
  softmax (CLIP / LiT): logits = e^t zi zt^T, loss = (CE_rows + CE_cols) / 2 with targets the
    diagonal; t learned, init log(1/0.07), e^t clipped at 100 (CLIP).
  sigmoid (SigLIP, Zhai et al. 2023): logits = e^t' zi zt^T + b, loss = -1/B sum_ij
    log sigmoid(l_ij logits_ij), l = +1 on the diagonal, -1 elsewhere; init t' = log 10, b = -10.
Optimiser: optax AdamW (decay on matrices only), global-norm clip 1, linear warm-up + cosine.
Batches: seeded per-epoch permutations of the pairs; the whole run is a jitted `lax.scan`.

Data. `--data digits` (default): captions are made from the labels with TRAIN_TEMPLATES and a
random word form ("three" or "3") per example and step. `--captions FILE.jsonl`: one
{"image": path, "caption": text} per line (relative paths from the file's folder). On digits,
same-class captions in a batch count as negatives (as in CLIP on web data): this bounds the loss,
not the zero-shot accuracy.

Zero-shot (CLIP's prompt ensembling): each class name (every word form) is put into every zero-shot
template; the prompt embeddings are L2-normalised, averaged per class and renormalised; val images
of `--data` go to the class of highest cosine. Reported: ensemble top-1, top-1 of each single
(template, form) prompt, and on digits the ensemble of templates *not* used in training.

    vit22b lit --checkpoint workdirs/digits --workdir workdirs/lit
    vit22b lit --checkpoint workdirs/digits --zero-shot-only --text-tower workdirs/lit

writes WORKDIR/lit.safetensors (text tower, image head, temperature, bias, feature stats; configs in
its metadata) and WORKDIR/lit.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from vit22b.data import DataError, load_image
from vit22b.tasks import common
from vit22b.tasks.common import TaskError
from vit22b.tasks.text import TextConfig, encode_text, init_text_params, tokenize, trim
from vit22b.weights import flatten, unflatten

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = ("a photo of the number {}", "a handwritten {}", "an image of a {}", "{}",
                   "a picture showing the digit {}", "this is a {}", "a scan of a handwritten {}",
                   "a small grayscale {}")
DIGIT_TEMPLATES = ("a photo of the number {}", "a handwritten {}", "a handwritten digit {}",
                   "the digit {}", "a drawing of the number {}", "{} written by hand",
                   "a blurry photo of a {}")
GENERIC_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture of the {}.",
                     "a close-up photo of a {}.")
WEIGHTS = "lit.safetensors"


# ----------------------------------------------------------------------------- losses and math
def l2_normalize(x: Any, axis: int = -1) -> Any:
    """x / ||x|| along `axis`, for numpy and jax arrays alike (array methods only)."""
    return x / ((x * x).sum(axis=axis, keepdims=True) + 1e-12) ** 0.5


def softmax_loss(zimg: jax.Array, ztxt: jax.Array, log_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE on normalised [B, E] embeddings; pair i is (zimg[i], ztxt[i])."""
    logits = jnp.exp(jnp.minimum(log_scale, np.log(100.0))) * zimg @ ztxt.T  # [B_img, B_txt]
    diag = jnp.arange(len(logits))
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, diag).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, diag).mean()
    return (i2t + t2i) / 2


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, log_scale: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP: every (image, text) pair is a binary problem, positives on the diagonal; / B."""
    logits = jnp.exp(log_scale) * zimg @ ztxt.T + bias  # [B, B]
    signs = 2 * jnp.eye(len(logits)) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / len(logits)


def ensemble(prompt_emb: np.ndarray) -> np.ndarray:
    """[C, P, E] prompt embeddings -> [C, E] class embeddings: normalise, mean over P, renormalise."""
    return l2_normalize(l2_normalize(prompt_emb).mean(axis=1))


def zero_shot_accuracy(zimg: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of argmax_c cos(image, class c); both sides are normalised here."""
    sims = l2_normalize(np.asarray(zimg, np.float64)) @ l2_normalize(np.asarray(class_emb, np.float64)).T
    return float(np.mean(np.argmax(sims, axis=1) == labels))  # ties -> the lowest class index


# ----------------------------------------------------------------------------- the two towers
def init_params(cfg: TextConfig, feature_dim: int, image_head: str, loss: str, seed: int) -> dict:
    params: dict[str, Any] = {"text": init_text_params(cfg, seed),
                              "log_scale": jnp.asarray(np.log(10.0 if loss == "sigmoid" else 1 / 0.07),
                                                       jnp.float32)}
    if loss == "sigmoid":
        params["bias"] = jnp.asarray(-10.0, jnp.float32)
    if image_head == "linear":
        w = np.random.default_rng([seed, 1]).standard_normal((feature_dim, cfg.embed_dim))
        params["image_head"] = {"kernel": jnp.asarray(w / np.sqrt(feature_dim), jnp.float32),
                                "bias": jnp.zeros(cfg.embed_dim, jnp.float32)}
    return params


def embed_images(params: dict, feats: jax.Array) -> jax.Array:
    """Standardised frozen features [N, D] -> normalised image embeddings [N, E]."""
    if "image_head" in params:
        feats = feats @ params["image_head"]["kernel"] + params["image_head"]["bias"]
    return l2_normalize(feats)


def embed_texts(params: dict, cfg: TextConfig, tokens: jax.Array) -> jax.Array:
    return l2_normalize(encode_text(params["text"], cfg, tokens))


def batch_loss(params: dict, cfg: TextConfig, feats: jax.Array, tokens: jax.Array,
               rows: jax.Array) -> jax.Array:
    """Loss of pairs (feats[b], tokens[rows[b]]). With fewer caption rows than pairs (captions made
    from labels) every row is encoded once and gathered: the same loss and gradient, less work."""
    if len(tokens) <= len(rows):
        ztxt = embed_texts(params, cfg, tokens)[rows]
    else:
        ztxt = embed_texts(params, cfg, tokens[rows])
    zimg = embed_images(params, feats)
    if "bias" in params:
        return sigmoid_loss(zimg, ztxt, params["log_scale"], params["bias"])
    return softmax_loss(zimg, ztxt, params["log_scale"])


def train_lit(params: dict, cfg: TextConfig, feats: np.ndarray, tokens: np.ndarray,
              choices: np.ndarray, *, steps: int, batch_size: int, lr: float = 1e-3,
              wd: float = 1e-4, warmup: int = 0, seed: int = 0, progress: bool = True) -> tuple[dict, float]:
    """Contrastive training on pairs p = (feats[p], tokens[choices[p, k]]), k uniform per step.

    feats [P, D] float, tokens [K, L] ids, choices [P, M] caption rows. Returns (params, mean loss
    of the last 50 steps)."""
    n = len(feats)
    if not 2 <= batch_size <= n:
        raise DataError(f"--batch-size {batch_size} does not fit the {n} training pairs: a "
                        f"contrastive batch needs between 2 and {n} pairs")
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:steps * batch_size]
    img_idx = order.reshape(steps, batch_size)
    txt_idx = choices[img_idx, rng.integers(0, choices.shape[1], img_idx.shape)]  # [S, B]

    def loss_fn(p: dict, data: tuple[jax.Array, jax.Array], idx: tuple[jax.Array, jax.Array]) -> jax.Array:
        feats, tokens = data
        return batch_loss(p, cfg, feats[idx[0]], tokens, idx[1])

    data = (jnp.asarray(feats, jnp.float32), jnp.asarray(trim(tokens)))
    params, losses = common.fit_head(loss_fn, params, data=data, steps=steps, lr=lr, warmup=warmup, wd=wd,
                                     inputs=lambda a, b: (img_idx[a:b], txt_idx[a:b]), clip=1.0,
                                     progress=progress, desc="lit")
    return params, float(np.mean(losses[-50:]))


# ----------------------------------------------------------------------------- zero-shot
def zero_shot(params: dict, cfg: TextConfig, zimg: np.ndarray, labels: np.ndarray,
              names: list[tuple[str, ...]], forms: tuple[str, ...], templates: tuple[str, ...],
              seen: tuple[str, ...] | None) -> dict[str, Any]:
    """Ensemble and single-prompt zero-shot top-1. names[c][f]: class c in word form f."""
    prompts = [t.format(n) for c in names for t in templates for n in c]  # class-major
    emb = jax.jit(embed_texts, static_argnums=1)(params, cfg, trim(tokenize(prompts, cfg.max_len)))
    emb = np.asarray(emb, np.float64).reshape(len(names), len(templates), len(forms), -1)  # [C,T,F,E]
    top1 = lambda e: zero_shot_accuracy(zimg, ensemble(e), labels)  # noqa: E731
    per = {t.replace("{}", f"<{f}>"): {"top1": top1(emb[:, i, j][:, None]),
                                       "seen_in_training": None if seen is None else t in seen}
           for i, t in enumerate(templates) for j, f in enumerate(forms)}
    singles = [v["top1"] for v in per.values()]
    out = {"top1": top1(emb.reshape(len(names), -1, emb.shape[-1])), "num_classes": len(names),
           "val_examples": len(labels), "chance": 1.0 / len(names), "class_names": names,
           "word_forms": list(forms), "templates": list(templates),
           "best_single_top1": max(singles), "mean_single_top1": float(np.mean(singles)), "per_template": per}
    if seen is not None:
        unseen = [i for i, t in enumerate(templates) if t not in seen]
        out["unseen_templates"] = [templates[i] for i in unseen]
        if unseen:
            out["unseen_ensemble_top1"] = top1(emb[:, unseen].reshape(len(names), -1, emb.shape[-1]))
    return out


# ----------------------------------------------------------------------------- data
def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """(absolute image path, caption) per non-blank JSONL line; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"captions file {str(path)!r} does not exist: pass a JSONL file with one "
                        '{"image": ..., "caption": ...} object per line')
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg}): write one "
                            '{"image": "path.png", "caption": "..."} object per line') from e
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) \
                or not isinstance(row.get("caption"), str):
            raise DataError(f"{path} line {n} lacks a string \"image\" and \"caption\": write "
                            '{"image": "path.png", "caption": "..."}')
        image = Path(row["image"]) if Path(row["image"]).is_absolute() else path.parent / row["image"]
        if not image.is_file():
            raise DataError(f"{path} line {n}: image {str(image)!r} does not exist (relative paths "
                            "resolve against the JSONL's folder): fix the path or remove the line")
        pairs.append((str(image), row["caption"]))
    if len(pairs) < 2:
        raise DataError(f"{path} has {len(pairs)} caption line(s): contrastive training needs at least 2")
    return pairs


def class_names(dataset: Any, arg: str | None) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """Per-class word forms and the forms' labels: digits -> ("three", "3"); else the folder or
    --class-names name with '_' as spaces."""
    if arg is not None:
        given = [s.strip() for s in arg.split(",")]
        if len(given) != dataset.num_classes or not all(given):
            raise DataError(f"--class-names has {len(given)} name(s) but {dataset.name!r} has "
                            f"{dataset.num_classes} classes {list(dataset.class_names)}: give one "
                            "non-empty name per class, comma-separated, in folder order")
        return [(g,) for g in given], ("name",)
    if dataset.num_classes < 2:
        raise DataError(f"{dataset.name!r} has {dataset.num_classes} class: zero-shot classification "
                        "needs at least 2 classes")
    if dataset.name == "digits":
        return [(NUMBER_WORDS[i], str(i)) for i in range(10)], ("word", "numeral")
    return [(c.replace("_", " "),) for c in dataset.class_names], ("name",)


def parse_templates(arg: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if arg is None:
        return default
    templates = tuple(t.strip() for t in arg.split("|") if t.strip())
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise TaskError(f"--templates {arg!r}: give '|'-separated templates, each with exactly one "
                        "{} for the class name, e.g. 'a photo of a {}|the {}'")
    return templates


# ----------------------------------------------------------------------------- saving
def save_tower(workdir: Path, params: dict, cfg: TextConfig, mean: np.ndarray, std: np.ndarray,
               meta: dict[str, Any]) -> Path:
    return common.save_head(workdir / WEIGHTS, {**params, "feature_mean": mean, "feature_std": std},
                            {"text_config": cfg.to_json(), "lit": json.dumps(meta)})


def load_tower(location: str | Path) -> tuple[dict, TextConfig, np.ndarray, np.ndarray, dict]:
    """(params, text config, feature mean, std, run metadata) from a `lit --workdir` dir."""
    path = Path(location) / WEIGHTS if Path(location).is_dir() else Path(location)
    if not path.is_file():
        raise TaskError(f"no LiT text tower at {str(path)!r}: pass the --workdir of a finished "
                        f"`vit22b lit` run (it holds {WEIGHTS})")
    try:
        flat = load_file(str(path))
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        cfg, lit = TextConfig.from_json(meta["text_config"]), json.loads(meta["lit"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise TaskError(f"{path} is not a LiT text tower ({e!r}): pass the --workdir of a "
                        "finished `vit22b lit` run") from e
    mean, std = flat.pop("feature_mean"), flat.pop("feature_std")
    want = flatten(init_params(cfg, len(mean), lit["image_head"], lit["loss"], 0))
    bad = [k for k in want if k not in flat or flat[k].shape != want[k].shape] + \
        [k for k in flat if k not in want]
    if bad:
        raise TaskError(f"{path}: tensor {bad[0]!r} is missing, unexpected or mis-shaped for its "
                        "text config: the file is damaged or from another version; retrain")
    return jax.tree.map(jnp.asarray, unflatten(flat)), cfg, mean, std, lit


# ----------------------------------------------------------------------------- the command
def cmd_lit(args: argparse.Namespace) -> int:
    t0, progress = time.time(), not args.no_progress
    if args.zero_shot_only != (args.text_tower is not None):
        raise TaskError("--zero-shot-only and --text-tower go together: pass both to evaluate a "
                        "trained text tower, or neither (and --workdir) to train one")
    if not args.zero_shot_only and not args.workdir:
        raise TaskError("--workdir is required to train: the text tower and lit.json go there")
    saved = load_tower(args.text_tower) if args.text_tower else None
    feature = args.feature or (saved[4]["feature"] if saved else "pre_logits")
    if saved and feature != saved[4]["feature"]:
        raise TaskError(f"the text tower at {args.text_tower} was trained on {saved[4]['feature']!r} "
                        f"features, not {feature!r}: drop --feature or pass the same one")
    model, dataset, adaptation = common.load_task(checkpoint=args.checkpoint, data=args.data,
                                                  image_size=args.image_size, val_data=args.val_data,
                                                  val_fraction=args.val_fraction)
    names, forms = class_names(dataset, args.class_names)
    digits = dataset.name == "digits"
    templates = parse_templates(args.templates, DIGIT_TEMPLATES if digits else GENERIC_TEMPLATES)
    fn = common.batch_fn(model, feature)
    x_val, y_val = common.run_batches(fn, dataset, "val", args.batch_size, progress, f"{feature} val")
    results: dict[str, Any] = {"task": "lit", "checkpoint": str(args.checkpoint), "data": dataset.name,
                               "image_size": dataset.image_size, "feature": feature,
                               "feature_dim": int(x_val.shape[1]), "channel_adaptation": adaptation}
    if saved:
        params, cfg, mean, std, meta = saved
        if len(mean) != x_val.shape[1]:
            raise TaskError(f"the text tower at {args.text_tower} was trained on {len(mean)}-d "
                            f"features but {args.checkpoint}'s {feature!r} is {x_val.shape[1]}-d: "
                            "use the checkpoint it was trained with")
        seen = meta.get("train_templates")
        results.update(text_tower=str(args.text_tower), trained=meta)
    else:
        if args.captions:
            pairs = read_captions(args.captions)
            paths = sorted({p for p, _ in pairs})
            size, channels = dataset.image_size, model.cfg.in_channels
            x_tr = common.apply_batched(  # the last batch padded: one compilation
                fn, paths, args.batch_size, dtype=np.float32, progress=progress, desc="caption images",
                prepare=lambda c: np.stack([load_image(p, size, channels) for p in c]))
            row = {p: i for i, p in enumerate(paths)}
            pair_img = np.array([row[p] for p, _ in pairs])
            captions, choices, seen = [c for _, c in pairs], np.arange(len(pairs))[:, None], None
        else:
            x_tr, y_tr = common.run_batches(fn, dataset, "train", args.batch_size, progress,
                                            f"{feature} train")
            pair_img = np.arange(len(x_tr))
            seen = list(TRAIN_TEMPLATES if digits else GENERIC_TEMPLATES[:3])
            captions = [t.format(n) for c in names for t in seen for n in c]  # class-major, C * T * F
            m = len(captions) // len(names)
            choices = y_tr[:, None] * m + np.arange(m)  # [N, T * F]: the rows of each example's class
        (x_tr,), (mean, std) = common.standardise(x_tr)
        embed = args.embed_dim if args.image_head == "linear" else int(x_tr.shape[1])
        cfg = TextConfig(max_len=args.max_len, width=args.text_width, depth=args.text_depth,
                         num_heads=args.text_heads, mlp_dim=4 * args.text_width, embed_dim=embed,
                         pool=args.text_pool)
        params = init_params(cfg, int(x_tr.shape[1]), args.image_head, args.loss, args.seed)
        warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
        params, loss = train_lit(params, cfg, x_tr[pair_img], tokenize(captions, cfg.max_len), choices,
                                 steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 wd=args.wd, warmup=warmup, seed=args.seed, progress=progress)
        meta = {"feature": feature, "image_head": args.image_head, "loss": args.loss,
                "checkpoint": str(args.checkpoint), "captions": args.captions or "class-name templates",
                "train_templates": seen}
        results.update(meta, text_config=json.loads(cfg.to_json()), steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, wd=args.wd, warmup=warmup,
                       seed=args.seed, train_pairs=len(pair_img), final_train_loss=loss,
                       truncated_captions=sum(len(c.encode()) > cfg.max_len - 1 for c in captions))
        save_tower(Path(args.workdir), params, cfg, mean, std, meta)
    results["temperature"] = float(jnp.exp(params["log_scale"]))
    if "bias" in params:
        results["bias"] = float(params["bias"])
    zimg = np.asarray(jax.jit(embed_images)(params, (x_val - mean) / std))
    results["zero_shot"] = zs = zero_shot(params, cfg, zimg, y_val, names, forms, templates, seen)
    results["seconds"] = time.time() - t0
    tower = Path(args.text_tower or args.workdir)
    tower = tower if tower.is_dir() else tower.parent
    if args.out and not saved:  # a trained tower's lit.json stays beside it; --out gets a copy
        common.write_json(tower / "lit.json", results)
    unseen = f", unseen-template ensemble {100 * zs['unseen_ensemble_top1']:.2f}%" \
        if "unseen_ensemble_top1" in zs else ""
    path = common.results_path("lit_zero_shot" if saved else "lit", checkpoint=args.checkpoint, out=args.out,
                               workdir=tower)
    return common.finish(results, path, f"LiT zero-shot top-1 {100 * zs['top1']:.2f}% on "
                         f"{zs['val_examples']} val images ({len(templates)} templates x {len(forms)} "
                         f"form(s); best single prompt {100 * zs['best_single_top1']:.2f}%, mean "
                         f"{100 * zs['mean_single_top1']:.2f}%{unseen}; chance {100 * zs['chance']:.1f}%) in "
                         f"{results['seconds']:.0f} s")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("lit", help="locked-image text tuning (LiT) + zero-shot top-1")
    common.add_common_args(p)  # --batch-size is both the feature and the contrastive batch
    p.add_argument("--workdir", default=None, help="where lit.safetensors + lit.json go")
    p.add_argument("--feature", default=None, help="frozen image feature (default pre_logits; "
                   "see `probe --feature`)")
    p.add_argument("--captions", default=None, help='JSONL of {"image": path, "caption": text} '
                   "(default: captions made from --data's labels)")
    p.add_argument("--class-names", default=None, help="comma-separated zero-shot names, one per "
                   "class (default: folder names; digits: 'three' and '3')")
    p.add_argument("--templates", default=None, help="'|'-separated zero-shot templates with {}")
    p.add_argument("--loss", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--image-head", choices=["linear", "none"], default="linear",
                   help="linear: learned projection of the frozen feature; none: fully locked (Lu)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine)")
    p.add_argument("--wd", type=float, default=1e-4, help="decoupled weight decay on matrices")
    p.add_argument("--warmup", type=int, default=None, help="default 5%% of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=48, help="text length in bytes (incl. eos)")
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-depth", type=int, default=2)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-pool", choices=["eos", "mean"], default="eos")
    p.add_argument("--embed-dim", type=int, default=64, help="joint dim (--image-head linear)")
    p.add_argument("--zero-shot-only", action="store_true", help="evaluate --text-tower, no training")
    p.add_argument("--text-tower", default=None, help="a `lit --workdir` to reload")
    p.set_defaults(func=cmd_lit)
