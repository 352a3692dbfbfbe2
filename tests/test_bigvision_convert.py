"""big_vision / AugReg .npz in and out, against timm's own reader (`_load_weights`): goldens in
tests/data/timm_vit/ (tests/data/make_goldens.py says how they were made)."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from vit22b.api import export_weights, import_weights
from vit22b.bigvision_convert import config_from_npz, npz_to_timm, read_npz, timm_to_npz
from vit22b.config import ConfigError
from vit22b.timm_convert import flat_to_timm, timm_to_flat
from vit22b.weights import read_weights, unflatten

DATA = Path(__file__).parent / "data" / "timm_vit"
ATOL = 1e-5
# npz file -> (family of the timm golden it was written from, export options that write it back)
NPZ = {
    "augreg.npz": ("augreg", dict(layout="augreg", prefix="", scan=False)),
    "siglip_scanned.npz": ("siglip", dict(layout="big_vision", prefix="params/img/", scan=True)),
    "siglip_bf16.npz": ("siglip", dict(layout="big_vision", prefix="params/img/", scan=False)),
}


def timm_logits(name: str) -> dict:
    return load_file(str(DATA / name.replace(".npz", "_logits.safetensors")))


@pytest.mark.parametrize("name", sorted(NPZ))
def test_npz_built_for_timms_loader_imports_with_timms_logits(name, forward):
    """The .npz that timm's _load_weights reads gives, in vit22b, the logits timm computed from it."""
    family, _ = NPZ[name]
    sd, facts = npz_to_timm(read_npz(DATA / name))
    assert facts["num_heads"] == 4 and facts["scanned"] == ("scanned" in name)
    # timm's goldens use exact GELU (timm's SigLIP and AugReg models do); an .npz defaults to tanh
    cfg = config_from_npz(sd, facts, gelu_approximate=False, dtype_mm="float32")
    assert cfg.head == ("map" if family == "siglip" else "token")
    assert cfg.class_posemb == (family == "augreg")
    ref = timm_logits(name)
    got, _ = forward(cfg)(unflatten(timm_to_flat(sd, cfg)), ref["input_nhwc"])
    np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["augreg.npz", "siglip_scanned.npz"])
def test_npz_state_equals_the_timm_golden_and_round_trips_exactly(name):
    family, opts = NPZ[name]
    golden = load_file(str(DATA / f"{family}.safetensors"))
    state = {k.removeprefix("param/"): v for k, v in golden.items() if k.startswith("param/")}
    raw = read_npz(DATA / name)
    sd, facts = npz_to_timm(raw)
    assert set(sd) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
    cfg = config_from_npz(sd, facts)
    back = timm_to_npz(flat_to_timm(timm_to_flat(sd, cfg), cfg), cfg, **opts)
    assert set(back) == set(raw)
    for k, v in raw.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bfloat16_arrays_are_widened_exactly():
    with np.load(DATA / "siglip_bf16.npz", allow_pickle=False) as z:
        stored = z["params/img/embedding/kernel"]
    assert stored.dtype == np.dtype("V2")
    w = read_npz(DATA / "siglip_bf16.npz")["params/img/embedding/kernel"]
    f32 = read_npz(DATA / "siglip_scanned.npz")["params/img/embedding/kernel"]
    assert w.dtype == np.float32 and 0 < np.abs(w - f32).max() <= np.abs(f32).max() * 2**-8
    np.testing.assert_array_equal(w.view(np.uint32) & 0xFFFF, 0)  # a bf16 value, widened exactly


@pytest.mark.parametrize("family", ["augreg", "siglip"])
def test_vit22b_npz_export_is_what_timm_loaded(family, tmp_path):
    """make_goldens.py step 2 loaded vit22b's .npz exports into timm with _load_weights and stored
    timm's logits: they equal timm's golden, and vit22b still writes exactly those arrays."""
    flags = dict(num_heads=4, gelu_approximate=False)
    opts = dict(npz_layout="augreg") if family == "augreg" else dict(npz_prefix="params/img/", npz_scan=True)
    import_weights(DATA / f"{family}.safetensors", tmp_path / "m", **flags)
    export_weights(tmp_path / "m", tmp_path / "out.npz", **opts)
    mine, committed = read_npz(tmp_path / "out.npz"), read_npz(DATA / f"{family}_from_vit22b.npz")
    assert set(mine) == set(committed)
    for k, v in committed.items():
        np.testing.assert_array_equal(mine[k], v, err_msg=k)
    from_timm = load_file(str(DATA / "vit22b_export_logits.safetensors"))[f"{family}_from_vit22b"]
    golden = load_file(str(DATA / f"{family}.safetensors"))
    np.testing.assert_allclose(from_timm, golden["logits"], rtol=0, atol=ATOL)
    # and the export imports back to the same model, bit for bit
    import_weights(tmp_path / "out.npz", tmp_path / "again", gelu_approximate=False)
    (a, cfg_a), (b, cfg_b) = read_weights(tmp_path / "m"), read_weights(tmp_path / "again")
    assert cfg_a == cfg_b and set(a) == set(b)
    for k, v in a.items():
        np.testing.assert_array_equal(b[k], v, err_msg=k)


def test_variant_picks_and_checks_the_config():
    sd, facts = npz_to_timm(read_npz(DATA / "siglip_scanned.npz"))
    with pytest.raises(ConfigError, match="--variant So400m/14: the file has width=64"):
        config_from_npz(sd, facts, variant="So400m/14")
    cfg = config_from_npz(sd, facts)
    assert (cfg.num_heads, cfg.gelu_approximate, cfg.norm_eps) == (4, True, 1e-6)
    with pytest.raises(ConfigError, match="contradicts the .npz"):
        config_from_npz(sd, facts, num_heads=2)


def test_bad_npz_files_are_refused(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable numpy .npz"):
        read_npz(tmp_path / "junk.npz")
    raw = read_npz(DATA / "augreg.npz")
    with pytest.raises(ConfigError, match="pre_logits/kernel"):
        npz_to_timm({**raw, "pre_logits/kernel": np.zeros((64, 64), np.float32)})
    with pytest.raises(ConfigError, match="lacks 'Transformer/encoderblock_1/LayerNorm_2/bias'"):
        npz_to_timm({k: v for k, v in raw.items() if k != "Transformer/encoderblock_1/LayerNorm_2/bias"})
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ConfigError):
        read_npz(tmp_path / "objects.npz")  # pickled objects are never loaded


def test_import_and_export_commands_round_trip_an_npz(tmp_path, capsys):
    from vit22b.cli import main

    src = DATA / "siglip_scanned.npz"
    out = str(tmp_path / "m")
    assert main(["import", str(src), "--out", out, "--variant", "mu/8", "--gelu", "exact"]) == 2
    assert "--variant mu/8: the file has width=64" in capsys.readouterr().err
    assert main(["import", str(src), "--out", str(tmp_path / "m"), "--gelu", "exact"]) == 0
    assert "4 heads" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "back.npz"), "--npz-prefix", "params/img/",
                 "--npz-scan"]) == 0
    raw, back = read_npz(src), read_npz(tmp_path / "back.npz")
    assert set(raw) == set(back)
    for k, v in raw.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # the timm alias takes a timm model name; a big_vision variant is refused for timm files
    assert main(["import-timm", str(DATA / "siglip.safetensors"), "--out", str(tmp_path / "t"),
                 "--variant", "B/16"]) == 2
    assert "--timm-model" in capsys.readouterr().err
