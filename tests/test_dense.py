"""`vit22b segment` / `vit22b depth`: metrics against hand-computed values, generator exactness,
decoder shapes and fitting, folder loading errors, and one end-to-end run of each command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import run_task
from vit22b.data import DataError
from vit22b.tasks import common, dense_data, dense_heads, depth, segment


# ----------------------------------------------------------------------------- metrics and losses
def test_miou_by_hand_with_ignore_and_absent_class():
    gt = np.array([0, 0, 1, 1, 2, 255, 255])
    pred = np.array([0, 1, 1, 1, 0, 2, 3])  # the two ignored pixels' predictions must not count
    cm = dense_heads.confusion_matrix(pred, gt, 4)
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    s = dense_heads.segmentation_scores(cm)
    # IoU0 = 1 / (1 + 1 FP + 1 FN), IoU1 = 2 / (2 + 1 FP), IoU2 = 0 / 1 FN, class 3 absent: excluded
    assert s["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 0.0, None])
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["classes_counted"] == 3
    # a class that is only predicted (a false positive, absent from the GT) counts with IoU 0
    only_pred = dense_heads.segmentation_scores(dense_heads.confusion_matrix(np.array([3]), np.array([0]), 4))
    assert only_pred["per_class_iou"] == [0.0, None, None, 0.0] and only_pred["miou"] == 0.0


def test_depth_metrics_match_numpy():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 50, (3, 5, 5)).astype(np.float32)
    gt[0, :2] = 0  # invalid pixels: any prediction there is ignored
    pred = (gt * rng.uniform(0.7, 1.4, gt.shape)).astype(np.float32)
    pred[0, :2] = 1e6
    v = gt > 0
    d, t = pred[v].astype(np.float64), gt[v].astype(np.float64)
    m = dense_heads.depth_metrics(pred, gt)
    assert m["abs_rel"] == pytest.approx(np.mean(np.abs(d - t) / t))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((d - t) ** 2)))
    assert m["delta1"] == pytest.approx(np.mean(np.maximum(d / t, t / d) < 1.25))
    assert m["valid_pixels"] == int(v.sum()) == 65
    perfect = dense_heads.depth_metrics(gt + (gt == 0), gt)
    assert perfect["abs_rel"] == 0 and perfect["delta1"] == 1


def test_losses_ignore_invalid_pixels():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 4, 4)).astype(np.uint8)
    labels[0, 0] = 255
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels != 255
    picked = np.take_along_axis(ref, np.where(keep, labels, 0)[..., None].astype(int), -1)[..., 0]
    got = jax.jit(dense_heads.segment_loss)(logits, labels)
    assert float(got) == pytest.approx(-np.mean(picked[keep]), 1e-5)
    depth = rng.uniform(1, 10, (2, 4, 4)).astype(np.float32)
    depth[1, 1] = 0
    log_pred = np.log(depth + (depth == 0)) + rng.normal(0, 0.1, depth.shape).astype(np.float32)
    g = (log_pred - np.log(np.where(depth > 0, depth, 1)))[depth > 0]
    both = jax.jit(lambda p, d: [dense_heads.depth_loss(p, d, k) for k in ("l1log", "silog")])
    l1, si = both(log_pred, depth)
    assert float(l1) == pytest.approx(np.mean(np.abs(g)), 1e-5)
    assert float(si) == pytest.approx(np.sqrt(np.mean(g ** 2) - 0.85 * np.mean(g) ** 2), 1e-4)


# ----------------------------------------------------------------------------- generators
def test_digit_canvases_are_deterministic_and_masks_exact():
    a = dense_data.digit_canvases(12, 24, seed=3, digit_size=12)
    b = dense_data.digit_canvases(12, 24, seed=3, digit_size=12)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], dense_data.digit_canvases(12, 24, seed=4, digit_size=12)[0])
    images, masks, placements = a
    assert images.shape == (12, 24, 24, 1) and masks.shape == (12, 24, 24)
    # the mask is exactly the drawn (above-threshold) pixels, and replaying the draws reproduces both
    np.testing.assert_array_equal(masks > 0, images[..., 0] > 128)
    glyphs, labels = common.digit_glyphs("train", 12)
    canvas, mask = np.zeros((12, 24, 24), np.uint8), np.zeros((12, 24, 24), np.uint8)
    for i, g, y, x in placements:
        stroke = glyphs[g] > 128
        canvas[i, y:y + 12, x:x + 12][stroke] = glyphs[g][stroke]
        mask[i, y:y + 12, x:x + 12][stroke] = labels[g] + 1
    np.testing.assert_array_equal(canvas, images[..., 0])
    np.testing.assert_array_equal(mask, masks)
    assert len(np.unique(masks)) > 5 and masks.max() <= 10
    rgb = dense_data.digit_canvases(2, 16, seed=0, split="val", in_channels=3)[0]
    assert rgb.shape == (2, 16, 16, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_depth_scenes_are_deterministic_and_depth_exact():
    a, b = dense_data.depth_scenes(4, 24, seed=5), dense_data.depth_scenes(4, 24, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], dense_data.depth_scenes(4, 24, seed=6)[1])
    for i in range(4):
        _, dep, scene = dense_data.render_scene(24, np.random.default_rng([5, 0, i]))
        np.testing.assert_array_equal(dep, a[1][i])
        zs = {np.float32(o[0]) for o in scene["objects"]}
        v = np.arange(24)[:, None] + 0.5 + np.zeros((1, 24))
        ground = (dep > 0) & ~np.isin(dep, list(zs))  # pixels not covered by an object see the ground
        z = scene["f"] * scene["h"] / (v[ground] - scene["v_h"])  # the ground plane's z per row
        np.testing.assert_allclose(dep[ground], z, rtol=1e-6)
        assert np.all(v[dep == 0] <= scene["v_h"] + scene["f"] * scene["h"] / 80.0)  # sky/too far only
        assert np.all(np.isin(dep[(dep > 0) & ~ground], list(zs)))


# ----------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("kind,levels,grid", [("linear", 1, 4), ("dpt", 1, 4), ("dpt", 4, 4), ("dpt", 3, 3)])
def test_decoder_output_shapes(kind, levels, grid):
    size = grid * 4
    dec = dense_heads.make_decoder(kind, 8, levels, 5, size, features=8)
    out = jax.eval_shape(dec, jax.ShapeDtypeStruct((2, levels, grid, grid, 8), jnp.float32))
    assert out.shape == (2, size, size, 5)


def test_dpt_decoder_overfits_a_tiny_set():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((4, 2, 4, 4, 8)).astype(np.float32)
    # labels: each 4x4-pixel patch takes the class of its token's argmax over 3 channels
    labels = np.argmax(tokens[:, -1, :, :, :3], -1).repeat(4, 1).repeat(4, 2).astype(np.uint8)
    dec = dense_heads.make_decoder("dpt", 8, 2, 3, 16, features=8)  # 2 levels: the fusion path runs
    _, losses = dense_heads.fit_decoder(dec, tokens, labels, dense_heads.segment_loss, steps=30,
                                        batch_size=4, lr=1e-2)
    assert losses[0] > 0.8 and losses[-1] < 0.25 * losses[0], losses[::10]


def test_dpt_layers_are_evenly_spaced():
    assert dense_heads.dpt_layers(24) == (5, 11, 17, 23)
    assert dense_heads.dpt_layers(4) == (0, 1, 2, 3)
    assert dense_heads.dpt_layers(1) == (0,)


# ----------------------------------------------------------------------------- folders
def _folder(root, names, *, size=(12, 10), mask_size=None, mask_value=1, mode="L"):
    """images/<name>.png + masks/<name>.png; the last file gets the fault (mode, mask size or value)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        Image.new(mode if name == names[-1] else "L", size, 100).save(root / "images" / f"{name}.png")
    for name in names[:-1] if mask_size == "missing" else names:
        last = name == names[-1]
        m = np.zeros(mask_size if last and isinstance(mask_size, tuple) else size[::-1], np.uint8)
        m[:, :3], m[0, 0] = mask_value if last else 1, 255
        Image.fromarray(m).save(root / "masks" / f"{name}.png")
    return root


def test_folder_loads_and_splits(tmp_path):
    data = dense_data.load_folder(_folder(tmp_path, list("abcde"), mask_value=2), "segment", 8, 1,
                                  val_fraction=0.4)
    assert data.train_images.shape == (3, 8, 8, 1) and data.val_targets.shape == (2, 8, 8)
    assert data.num_classes == 3 and data.train_targets[0, 0, 0] == 255
    assert set(np.unique(data.train_targets)) <= {0, 1, 2, 255}  # nearest-neighbour: no blended ids
    dep = tmp_path / "d"
    (dep / "images").mkdir(parents=True)
    (dep / "depth").mkdir()
    for i in range(3):
        Image.new("L", (6, 6), 50).save(dep / "images" / f"{i}.png")
    np.save(dep / "depth" / "0.npy", np.full((6, 6), 2.5, np.float32))
    np.save(dep / "depth" / "1.npy", np.zeros((6, 6), np.float32))
    Image.fromarray(np.full((6, 6), 1500, np.uint16)).save(dep / "depth" / "2.png")
    d = dense_data.load_folder(dep, "depth", 4, 1, val_fraction=0.34)
    values = sorted(float(x.max()) for x in (*d.train_targets, *d.val_targets))
    assert values == [0.0, 1.5, 2.5]  # the 16-bit PNG is millimetres


@pytest.mark.parametrize("case,match", [
    ("missing", r"images/e\.png' has no mask"),
    ("value", r"e\.png' has class id 7 but there are 3 classes"),
    ("size", r"mask .*e\.png' is 4x4 but its image is 12x10"),
    ("channels", r"has 3 channel\(s\) \(mode RGB\) but the checkpoint takes 1"),
])
def test_folder_errors_name_the_file(tmp_path, case, match):
    kwargs = {"missing": {"mask_size": "missing"}, "value": {"mask_value": 7}, "size": {"mask_size": (4, 4)},
              "channels": {"mode": "RGB"}}[case]
    root = _folder(tmp_path, list("abcde"), **kwargs)
    with pytest.raises(DataError, match=match):
        dense_data.load_folder(root, "segment", 8, 1, num_classes=3 if case == "value" else None)
    with pytest.raises(DataError, match="is not a folder"):
        dense_data.load_folder(tmp_path / "nope", "segment", 8, 1)


# ----------------------------------------------------------------------------- commands
@pytest.mark.slow
def test_segment_command_writes_json(digits_ckpt, tmp_path, capsys):
    argv = ["--checkpoint", str(digits_ckpt), "--image-size", "16", "--num-train", "24", "--num-val", "8",
            "--decoder", "linear", "--steps", "20", "--batch-size", "8", "--workdir", str(tmp_path),
            "--no-progress"]
    assert run_task(segment, argv) == 0
    r = json.loads((tmp_path / "segment.json").read_text())
    assert r["num_classes"] == 11 and r["grid_size"] == 4 and r["layers"] == ["encoded"]
    assert r["final_train_loss"] < r["first_train_loss"]
    # the baseline a decoder must beat, against scikit-learn on the same generated canvases
    from sklearn.metrics import jaccard_score

    data = dense_data.synthetic("segment", 16, 1, 24, 8, seed=0)
    y_tr, y_val = data.train_targets, data.val_targets
    majority = np.bincount(y_tr[y_tr != dense_data.IGNORE]).argmax()
    gt = y_val[y_val != dense_data.IGNORE]
    assert majority == 0  # background is most of each canvas
    assert r["baseline"]["val_pixel_accuracy"] == pytest.approx(np.mean(gt == majority))
    assert r["baseline"]["val_miou"] == pytest.approx(
        jaccard_score(gt, np.full_like(gt, majority), average="macro", zero_division=0))
    assert r["baseline"]["predict"].startswith("class 0")
    assert (tmp_path / "segment_decoder.safetensors").exists()
    assert "val mIoU" in capsys.readouterr().out


@pytest.mark.slow
def test_depth_command_writes_json_and_reports_baselines(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "depth.json"
    argv = ["--checkpoint", str(digits_ckpt), "--image-size", "16", "--num-train", "24", "--num-val", "8",
            "--steps", "30", "--batch-size", "8", "--features", "8", "--out", str(out), "--no-progress"]
    assert run_task(depth, argv) == 0
    r = json.loads(out.read_text())
    assert r["decoder"] == "dpt" and r["layers"] == [0]  # mu/4: one block
    assert r["final_train_loss"] < r["first_train_loss"]
    # the baselines against numpy on the same generated scenes: AbsRel = mean |d - t| / t over the
    # val pixels with depth, delta1 = share of them within a factor 1.25
    data = dense_data.synthetic("depth", 16, 1, 24, 8, seed=0)
    y_tr, y_val = data.train_targets, data.val_targets
    t = y_val[y_val > 0].astype(np.float64)
    mean = y_tr[y_tr > 0].astype(np.float64).mean()
    assert r["val_valid_pixels"] == len(t)
    assert r["baseline_train_mean"]["abs_rel"] == pytest.approx(np.mean(np.abs(mean - t) / t))
    assert r["baseline_train_mean"]["delta1"] == pytest.approx(np.mean(np.maximum(mean / t, t / mean) < 1.25))
    per_pixel = np.broadcast_to((y_tr * (y_tr > 0)).sum(0) / np.maximum((y_tr > 0).sum(0), 1), y_val.shape)
    d = per_pixel[y_val > 0]
    assert r["baseline_train_mean_per_pixel"]["abs_rel"] == pytest.approx(np.mean(np.abs(d - t) / t))
    assert "AbsRel" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not a positive multiple of the checkpoint's patch size 4"):
        run_task(depth, ["--checkpoint", str(digits_ckpt), "--image-size", "10"])
