"""vit22b.tasks.text: the byte tokenizer (ids, padding, truncation, UTF-8) and the text tower vs numpy.
(Training through the tower is exercised by the `lit` command tests in test_lit.py.)"""

import jax
import numpy as np
import pytest

from vit22b.tasks.text import EOS, PAD, TextConfig, detokenize, encode_text, init_text_params, tokenize, trim


def test_tokenize_ascii_ids_eos_and_padding():
    ids = tokenize(["ab", ""], max_len=5)
    assert ids.dtype == np.int32 and ids.shape == (2, 5)
    np.testing.assert_array_equal(ids[0], [ord("a") + 3, ord("b") + 3, EOS, PAD, PAD])
    np.testing.assert_array_equal(ids[1], [EOS, PAD, PAD, PAD, PAD])
    assert detokenize(ids[0]) == "ab" and detokenize(ids[1]) == ""
    np.testing.assert_array_equal(tokenize("ab", 5), ids[:1])  # a lone string is a batch of one


@pytest.mark.parametrize("text", ["a photo of the number three", "naïve café ✓ 日本語 🙂", "tab\tnew\nline"])
def test_round_trip_any_unicode(text):
    ids = tokenize([text], max_len=64)[0]
    n = len(text.encode("utf-8"))
    assert ids[n] == EOS and (ids[n + 1:] == PAD).all() and (ids[:n] >= 3).all()
    assert detokenize(ids) == text


def test_truncation_keeps_eos_and_never_splits_a_character():
    ids = tokenize(["hello world"], max_len=8)[0]
    assert ids[-1] == EOS and detokenize(ids) == "hello w"  # 7 bytes + eos
    # "é" is 2 bytes: 5 byte slots hold "éé" + 1 byte of the third, which must be dropped
    ids = tokenize(["ééé"], max_len=6)[0]
    assert detokenize(ids) == "éé"
    np.testing.assert_array_equal(ids, [0xC3 + 3, 0xA9 + 3, 0xC3 + 3, 0xA9 + 3, EOS, PAD])
    assert detokenize(tokenize(["🙂"], max_len=4)[0]) == ""  # a 4-byte character does not fit 3 slots
    with pytest.raises(ValueError, match="max_len"):
        tokenize(["x"], max_len=1)


def test_text_config_validation():
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        TextConfig(width=64, num_heads=3)
    with pytest.raises(ValueError, match="pool"):
        TextConfig(pool="cls")  # type: ignore[arg-type]
    cfg = TextConfig(width=32, depth=1, pool="mean")
    assert TextConfig.from_json(cfg.to_json()) == cfg


def _numpy_tower(p, cfg, tokens):
    """A plain numpy pre-LN transformer: the reference for encode_text."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def ln(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def gelu(x):  # jax.nn.gelu's default tanh approximation
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    out = []
    for row in tokens:
        real = row != PAD
        x = p["token_embedding"][row] + p["pos_embedding"][:len(row)]  # [L, W]
        heads, dh = cfg.num_heads, cfg.width // cfg.num_heads
        for i in range(cfg.depth):
            b = p[f"block_{i}"]
            qkv = ln(x, b["ln1"]) @ b["qkv"]["kernel"] + b["qkv"]["bias"]
            q, k, v = np.split(qkv, 3, axis=-1)
            att = []
            for h in range(heads):
                s = slice(h * dh, (h + 1) * dh)
                logits = q[:, s] @ k[:, s].T / np.sqrt(dh)
                logits[:, ~real] = -np.inf  # pad keys
                w = np.exp(logits - logits.max(1, keepdims=True))
                att.append((w / w.sum(1, keepdims=True)) @ v[:, s])
            x = x + np.concatenate(att, -1) @ b["out"]["kernel"] + b["out"]["bias"]
            h1 = gelu(ln(x, b["ln2"]) @ b["mlp1"]["kernel"] + b["mlp1"]["bias"])
            x = x + h1 @ b["mlp2"]["kernel"] + b["mlp2"]["bias"]
        x = ln(x, p["final_ln"])
        pooled = x[list(row).index(EOS)] if cfg.pool == "eos" else x[real].mean(0)
        out.append(pooled @ p["proj"]["kernel"])
    return np.stack(out)


@pytest.mark.parametrize("pool", ["eos", "mean"])
def test_text_tower_matches_numpy_and_ignores_padding(pool):
    cfg = TextConfig(max_len=16, width=16, depth=2, num_heads=2, mlp_dim=32, embed_dim=8, pool=pool)
    params = init_text_params(cfg, seed=0)
    rng = np.random.default_rng(0)  # perturb LN/biases so a missed term shows
    params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                          params)
    tokens = tokenize(["the digit 3", "a", "tres ✓", "a much longer caption!"], cfg.max_len)
    encode = jax.jit(encode_text, static_argnums=1)
    got = np.asarray(encode(params, cfg, tokens))
    assert got.shape == (4, 8)
    np.testing.assert_allclose(got, _numpy_tower(params, cfg, tokens), rtol=2e-4, atol=2e-5)
    # pad columns change nothing: trimmed to the longest text, the embeddings are the same
    np.testing.assert_allclose(encode(params, cfg, trim(tokens[:3])), got[:3], rtol=1e-5, atol=1e-6)
    assert trim(tokens[:2]).shape == (2, len("the digit 3") + 1)
    with pytest.raises(ValueError, match="at most 16"):
        encode_text(params, cfg, tokenize(["x"], 17))

