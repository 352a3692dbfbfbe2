"""Untrusted files and inputs: nothing executed, nothing huge allocated, one line each.

safetensors files with oversized headers, shape bombs and NaN/Inf weights; pickles handed to
import-timm (never loaded: a pickle that would create a file on load must leave no file);
.npy/.npz with object arrays; and the input contract of `vit22b predict --input-npy`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vit22b.cli import main
from vit22b.config import preset
from vit22b.data import DataError
from vit22b.inputs import load_input_npy, model_inputs
from vit22b.weights import WeightsError, read_safetensors, save_model

CFG = preset("mu/4", image_size=8, in_channels=1, num_classes=10, dtype_mm="float32")


def cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def _raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


class _WouldRun:
    """Unpickling this creates `marker`: the proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "pickle-was-executed"
    evil = pickle.dumps({"blocks.0.weight": _WouldRun(marker)})
    pth = tmp_path / "model.pth"
    with zipfile.ZipFile(pth, "w") as z:  # torch.save's format: a zip holding data.pkl
        z.writestr("archive/data.pkl", evil)
    (tmp_path / "model.pkl").write_bytes(evil)
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    # A header length of 2^62 bytes: refused from the first 8 bytes, nothing read or allocated.
    (tmp_path / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return {
        "pickle": tmp_path / "model.pkl",
        "torch zip": pth,
        "random bytes": tmp_path / "random.safetensors",
        "empty": tmp_path / "empty.safetensors",
        "oversized header": tmp_path / "huge_header.safetensors",
        "shape bomb": _raw_safetensors(tmp_path / "bomb.safetensors", {
            "w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}, bytes(16)),
        "offset bomb": _raw_safetensors(tmp_path / "offsets.safetensors", {
            "w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, bytes(16)),
    }


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    return _bad_files(tmp_path)


def test_unreadable_safetensors_are_one_line_errors(bad_files, tmp_path):
    for kind, path in bad_files.items():
        with pytest.raises(WeightsError) as info:
            read_safetensors(path)
        message = str(info.value)
        assert "\n" not in message, kind
        assert message.startswith(f"{path} is not a readable safetensors file ("), kind
        assert "pickled .pth/.bin/.pt files are never loaded" in message
    assert not (tmp_path / "pickle-was-executed").exists()


def test_import_timm_refuses_pickles_in_one_line(bad_files, tmp_path):
    for kind in ("pickle", "torch zip", "shape bomb"):
        rc, _, err = cli("import-timm", bad_files[kind], "--out", tmp_path / "out", "--num-heads", "4")
        line, = err.splitlines()
        assert rc == 2 and line.startswith(f"vit22b import-timm: error: {bad_files[kind]} is not a "
                                           "readable safetensors file"), kind
    assert not (tmp_path / "pickle-was-executed").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, bad):
    values = np.zeros((3, 4), np.float32)
    values[1, 2] = bad
    save_file({"ok": np.ones(2, np.float32), "head_kernel": values}, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"tensor 'head_kernel' holds 1 NaN/Inf value\(s\)"):
        read_safetensors(tmp_path / "w.safetensors")


def test_object_arrays_are_never_unpickled(tmp_path):
    marker = tmp_path / "pickle-was-executed"
    obj = np.array([_WouldRun(marker)], dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "obj.npz", images=obj)
    np.savez(tmp_path / "plain.npz", images=np.zeros((1, 8, 8, 1), np.float32))
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    for name, match in (("obj.npy", "not a plain .npy array .*Object arrays cannot be loaded"),
                        ("obj.npz", "is an .npz archive"), ("plain.npz", "is an .npz archive"),
                        ("garbage.npy", "not a plain .npy array"), ("missing.npy", "does not exist")):
        with pytest.raises(DataError, match=match):
            load_input_npy(tmp_path / name, 8, 1)
    assert not marker.exists()


# --- the predict input contract ----------------------------------------------------------------


def test_uint8_is_scaled_exactly_as_in_training():
    x = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    np.testing.assert_array_equal(model_inputs(x, 8, 1), x.astype(np.float32) / np.float32(127.5) - 1)
    f = np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 8, 8, 1)
    assert model_inputs(f, 8, 1) is not f and np.array_equal(model_inputs(f, 8, 1), f)


@pytest.mark.parametrize("x, match", [
    (np.full((2, 8, 8, 1), 255.0, np.float32), r"span \[255, 255\] but the model takes \[-1, 1\]"),
    (np.full((2, 8, 8, 1), 1.002, np.float32), r"span \[1.002, 1.002\]"),
    (np.full((2, 8, 8, 1), np.nan, np.float32), "128 NaN/Inf value"),
    (np.zeros((2, 8, 8, 1), np.int64), r"dtype int64 is neither float in \[-1, 1\].*astype\(np.uint8\)"),
    (np.zeros((2, 1, 8, 8), np.float32), r"channels-first \(NCHW\): expected \[batch, 8, 8, 1\].*"
                                         r"transpose\(0, 2, 3, 1\)"),
    (np.zeros((8, 8, 1), np.float32), r"unbatched .*expected \[batch, 8, 8, 1\]; add the batch axis"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"3 channel\(s\) but the model takes 1"),
    (np.zeros((2, 16, 16, 1), np.float32), r"shape \[2, 16, 16, 1\] is not \[batch, 8, 8, 1\]"),
])
def test_inputs_outside_the_contract_are_refused(x, match):
    with pytest.raises(DataError, match=match):
        model_inputs(x, 8, 1)
    model_inputs(np.full((1, 8, 8, 1), 1.001, np.float32), 8, 1)  # rounding slack


def test_any_float_range_keeps_every_other_check():
    timm_normalised = np.full((1, 8, 8, 1), 2.5, np.float32)  # ImageNet mean/std reaches ~2.6
    assert np.array_equal(model_inputs(timm_normalised, 8, 1, float_range=False), timm_normalised)
    with pytest.raises(DataError, match="--any-float-range"):
        model_inputs(timm_normalised, 8, 1)
    for bad in (np.full((1, 8, 8, 1), np.inf, np.float32), np.zeros((1, 1, 8, 8), np.float32)):
        with pytest.raises(DataError):
            model_inputs(bad, 8, 1, float_range=False)


@pytest.mark.slow
def test_predict_uint8_equals_scaled_float_and_refuses_nan(tmp_path, random_params):
    model = tmp_path / "model"
    save_model(model, random_params(CFG), CFG)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "f32.npy", images.astype(np.float32) / np.float32(127.5) - 1)
    np.save(tmp_path / "nan.npy", np.full((1, 8, 8, 1), np.nan, np.float32))
    outs = []
    for name in ("u8", "f32"):
        rc, _, err = cli("predict", "--checkpoint", model, "--input-npy", tmp_path / f"{name}.npy",
                         "--output-npy", tmp_path / f"{name}_logits.npy")
        assert rc == 0, err
        outs.append(np.load(tmp_path / f"{name}_logits.npy"))
    np.testing.assert_array_equal(outs[0], outs[1])
    rc, _, err = cli("predict", "--checkpoint", model, "--input-npy", tmp_path / "nan.npy",
                     "--output-npy", tmp_path / "nan_logits.npy")
    line, = err.splitlines()
    assert rc == 2 and "nan.npy: 64 NaN/Inf value(s)" in line and not (tmp_path / "nan_logits.npy").exists()

    # NaN weights: refused when the model is loaded, before anything runs.
    weights = load_file(str(model / "model.safetensors"))
    weights["head_bias"][0] = np.nan
    save_file(weights, str(model / "model.safetensors"))
    rc, _, err = cli("predict", "--checkpoint", model, "--input-npy", tmp_path / "u8.npy")
    line, = err.splitlines()
    assert rc == 2 and "tensor 'head_bias' holds 1 NaN/Inf value(s)" in line
