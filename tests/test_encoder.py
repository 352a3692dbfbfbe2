"""The encoder blocks against plain numpy references, and the scan / remat / dtype switches."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vit22b.config import ConfigError, ModelConfig
from vit22b.model import abstract_model, apply, split_params

# --- a float64 numpy reference, written from the formulas (not from the implementation) --------


def np_norm(x, scale, bias, kind, eps):
    """RMSNorm (no centring) or LayerNorm over the last axis."""
    if kind == "layer":
        x = x - x.mean(-1, keepdims=True)
        y = x / np.sqrt(x.var(-1, keepdims=True) + eps)
    else:
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    y = y * scale
    return y if bias is None else y + bias


def np_gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def np_attention(p, q, k, v, cfg):
    """q, k, v: [B, N, H, hd] -> ([B, N, H*hd], max logit). QK norm per head over head_dim."""
    B, N, H, hd = q.shape
    if cfg.qkv_bias:
        b = p["qkv_bias"]  # [H, 3*hd], per head q | k | v
        q, k, v = q + b[:, :hd], k + b[:, hd:2 * hd], v + b[:, 2 * hd:]
    if cfg.qk_norm:
        kind = cfg.qk_norm_type or cfg.norm
        q = np_norm(q, p["q_norm_scale"], p.get("q_norm_bias"), kind, cfg.norm_eps)
        k = np_norm(k, p["k_norm_scale"], p.get("k_norm_bias"), kind, cfg.norm_eps)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", w, v)
    return o.reshape(B, N, H * hd), logits.max()


def np_parallel_block(p, x, cfg):
    """y = x + MLP(N(x)) + Attn(N(x)) with separate q/k/v/MLP matrices taken out of the fused
    kernels per encoder.py's layout: in [D, H, q|k|v|mlp], out [H, attn|mlp, D]."""
    D, H, hd, M = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    B, N, _ = x.shape
    w_in, w_out = p["in_kernel"], p["out_kernel"]
    Wq = w_in[:, :, :hd].reshape(D, H * hd)
    Wk = w_in[:, :, hd:2 * hd].reshape(D, H * hd)
    Wv = w_in[:, :, 2 * hd:3 * hd].reshape(D, H * hd)
    W1 = w_in[:, :, 3 * hd:].reshape(D, M)
    Wo = w_out[:, :hd, :].reshape(H * hd, D)
    W2 = w_out[:, hd:, :].reshape(M, D)

    h = np_norm(x, p["norm_scale"], p.get("norm_bias"), cfg.norm, cfg.norm_eps)
    q, k, v = ((h @ W).reshape(B, N, H, hd) for W in (Wq, Wk, Wv))
    attn, stat = np_attention(p, q, k, v, cfg)
    m = h @ W1
    if cfg.mlp_bias:
        m = m + p["mlp_in_bias"].reshape(M)
    y = attn @ Wo + np_gelu(m, cfg.gelu_approximate) @ W2
    if cfg.mlp_bias or cfg.out_bias:
        y = y + p["out_bias"]
    return x + y, stat


def np_sequential_block(p, x, cfg):
    """x' = x + Attn(N1(x)); y = x' + MLP(N2(x'))."""
    D, H, hd = cfg.width, cfg.num_heads, cfg.head_dim
    B, N, _ = x.shape
    w = p["qkv_kernel"]  # [D, H, q|k|v]
    h = np_norm(x, p["attn_norm_scale"], p.get("attn_norm_bias"), cfg.norm, cfg.norm_eps)
    q, k, v = ((h @ w[:, :, i * hd:(i + 1) * hd].reshape(D, H * hd)).reshape(B, N, H, hd)
               for i in range(3))
    attn, stat = np_attention(p, q, k, v, cfg)
    y = attn @ p["attn_out_kernel"].reshape(H * hd, D)
    if cfg.out_bias:
        y = y + p["attn_out_bias"]
    x = x + y
    h = np_norm(x, p["mlp_norm_scale"], p.get("mlp_norm_bias"), cfg.norm, cfg.norm_eps)
    m = h @ p["mlp_in_kernel"]
    if cfg.mlp_bias:
        m = m + p["mlp_in_bias"]
    y = np_gelu(m, cfg.gelu_approximate) @ p["mlp_out_kernel"]
    if cfg.mlp_bias:
        y = y + p["mlp_out_bias"]
    return x + y, stat


BLOCK_VARIANTS = {
    "parallel_default": {},
    "parallel_layer_biases_exact_gelu": dict(norm="layer", norm_bias=True, qkv_bias=True,
                                             gelu_approximate=False, qk_norm_type="rms"),
    "parallel_no_qknorm_no_biases": dict(qk_norm=False, mlp_bias=False, out_bias=False),
    "parallel_out_bias_only": dict(mlp_bias=False, out_bias=True, qk_norm_type="layer"),
    "sequential_default": dict(block="sequential"),
    "sequential_layer_biases": dict(block="sequential", norm="layer", norm_bias=True, qkv_bias=True,
                                    out_bias=False, gelu_approximate=False),
}


@pytest.mark.parametrize("variant", sorted(BLOCK_VARIANTS))
def test_blocks_match_numpy_reference(variant, tiny2_cfg, images, random_params, forward):
    """block_0 = ref(with_posemb), block_1 = ref(block_0), attn_logit_max = ref's max logit."""
    cfg = tiny2_cfg.replace(head="gap", **BLOCK_VARIANTS[variant])  # gap: less to compile
    params = random_params(cfg, seed=3)
    _, out = forward(cfg, return_layers=(0, 1), attn_stats=True)(params, images)
    ref_block = np_parallel_block if cfg.block == "parallel" else np_sequential_block
    enc = {k: np.asarray(v, np.float64) for k, v in params["encoder"].items()}
    x = np.asarray(out["with_posemb"], np.float64)
    for i in range(cfg.depth):
        want, stat = ref_block({k: v[i] for k, v in enc.items()}, x, cfg)
        got = np.asarray(out[f"block_{i}"])
        assert np.abs(want - x).max() > 0.1  # the block does something
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"block {i}")
        np.testing.assert_allclose(out["attn_logit_max"][i], stat, rtol=1e-5, atol=1e-5)
        x = np.asarray(out[f"block_{i}"], np.float64)


def test_qk_norm_bounds_attention_logits(tiny_cfg, images, random_params, forward):
    """With RMS QK norm and unit scales, |q.k|/sqrt(d) <= sqrt(d); without it logits grow with the
    kernels' scale (the instability the paper fixes)."""
    cfg = tiny_cfg.replace(head="gap")
    params = random_params(cfg)
    enc = params["encoder"]
    enc["q_norm_scale"] = jnp.ones_like(enc["q_norm_scale"])
    enc["k_norm_scale"] = jnp.ones_like(enc["k_norm_scale"])
    enc["in_kernel"] = 100.0 * enc["in_kernel"]
    _, out = forward(cfg, attn_stats=True)(params, images)
    assert out["attn_logit_max"].shape == (cfg.depth,)
    assert float(out["attn_logit_max"].max()) <= np.sqrt(cfg.head_dim) + 1e-3
    cfg_off = cfg.replace(qk_norm=False)
    params_off = dict(params, encoder={k: v for k, v in enc.items() if "norm_scale" not in k
                                       or k == "norm_scale"})
    _, out_off = forward(cfg_off, attn_stats=True)(params_off, images)
    assert float(out_off["attn_logit_max"].max()) > 100 * np.sqrt(cfg.head_dim)


def test_scan_and_loop_agree(tiny2_cfg, images, random_params, forward):
    tiny2_cfg = tiny2_cfg.replace(head="gap")
    params = random_params(tiny2_cfg)
    kw = dict(return_layers=(0, 1), attn_stats=True)
    _, scanned = forward(tiny2_cfg.replace(scan=True), **kw)(params, images)
    _, looped = forward(tiny2_cfg.replace(scan=False), **kw)(params, images)
    assert scanned.keys() == looped.keys()
    # Float rounding only: XLA's -O1 (conftest.FAST_COMPILE) fuses the two programs differently,
    # 1.4e-6 apart on outputs of size ~1; a real mix-up of layers is off by O(1).
    for key in scanned:
        np.testing.assert_allclose(scanned[key], looped[key], rtol=1e-6, atol=4e-6, err_msg=key)


def loss_and_grad(cfg, params, images):
    graphdef, _ = split_params(abstract_model(cfg))
    target = np.random.default_rng(7).standard_normal((images.shape[0], cfg.num_classes))

    def loss(p):
        logits, _ = apply(graphdef, p, images)
        return jnp.sum(logits * target)

    return jax.jit(jax.value_and_grad(loss))(params)


def assert_same_loss_and_grad(ref_cfg, cfg, params, images, grad_atol=1e-6):
    """Two execution configs of one model: equal loss and gradients for the same parameters."""
    ref_loss, ref_grad = loss_and_grad(ref_cfg, params, images)
    loss, grad = loss_and_grad(cfg, params, images)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=grad_atol)


def program_text(cfg, params, images) -> str:
    """The StableHLO of cfg's forward pass (in the current mesh, if any)."""
    graphdef, _ = split_params(abstract_model(cfg))
    return jax.jit(lambda p, x: apply(graphdef, p, x)[0]).lower(params, images).as_text()


@pytest.mark.slow
@pytest.mark.parametrize("scan, policies", [(True, ("nothing_saveable", "dots_saveable")),
                                            (False, ("nothing_saveable",))])
def test_remat_policies_give_same_output_and_gradient(scan, policies, tiny2_cfg, images,
                                                      random_params):
    base_cfg = tiny2_cfg.replace(scan=scan, head="gap")  # remat is about the encoder
    params = random_params(base_cfg)
    for policy in policies:
        assert_same_loss_and_grad(base_cfg.replace(remat="none"), base_cfg.replace(remat=policy),
                                  params, images, grad_atol=1e-5)


def test_split_and_fused_out_projection_agree(tiny2_cfg, images, random_params):
    """The split out-projection (the default) is the fused one's sum as two matmuls: same loss and
    gradients, and its program has no concatenate of the [B, N, H, hd + M/H] matmul input."""
    cfg = tiny2_cfg.replace(head="gap", fused_layout="per_head")  # the [B, N, H, F] layout
    params = random_params(cfg)
    assert_same_loss_and_grad(cfg.replace(out_projection="fused"), cfg.replace(out_projection="split"),
                              params, images)

    def concatenates(out_projection: str) -> int:
        text = program_text(cfg.replace(out_projection=out_projection), params, images)
        hd_plus = cfg.head_dim + cfg.mlp_dim // cfg.num_heads  # [2, 16, 2, 80]: B, N, H, hd + M/H
        return len(re.findall(rf"stablehlo\.concatenate.*-> tensor<2x16x2x{hd_plus}x", text))

    assert concatenates("fused") == 1 and concatenates("split") == 0
    with pytest.raises(ConfigError, match="out_projection='both'.*'split' or 'fused'"):
        cfg.replace(out_projection="both")


@pytest.mark.parametrize("out_projection", ["split", "fused"])
def test_contiguous_fused_layout_is_the_same_function(out_projection, tiny2_cfg, images, random_params):
    """The kernels regrouped q | k | v | mlp inside the step (timm's order) compute the function
    of the per-head layout they are stored in: same loss and gradients (for the stored per-head
    kernels), MLP biases included; the program multiplies by one [D, 3D + M] in-kernel."""
    cfg = tiny2_cfg.replace(head="gap", out_projection=out_projection, mlp_bias=True, out_bias=True)
    params = random_params(cfg)
    assert_same_loss_and_grad(cfg.replace(fused_layout="per_head"), cfg.replace(fused_layout="contiguous"),
                              params, images)
    D, M = cfg.width, cfg.mlp_dim
    text = program_text(cfg.replace(fused_layout="contiguous"), params, images)
    assert re.search(rf"stablehlo\.dot_general.*tensor<{D}x{3 * D + M}xf32>", text)


def test_auto_fused_layout_follows_the_model_axis(tiny2_cfg, images, random_params):
    """"auto": contiguous without a model axis; on a mesh that shards heads over a model axis of
    2, the per-head kernels as stored (each device multiplies by its own heads)."""
    from vit22b.sharding import make_mesh

    cfg = tiny2_cfg.replace(head="gap")
    assert cfg.fused_layout == "auto"
    params = random_params(cfg)
    D, M = cfg.width, cfg.mlp_dim
    contiguous_dot = rf"stablehlo\.dot_general.*tensor<{D}x{3 * D + M}xf32>"

    def program(mesh_spec: str | None) -> str:
        if mesh_spec is None:
            return program_text(cfg, params, images)
        with jax.set_mesh(make_mesh(mesh_spec, jax.devices()[:2])):
            return program_text(cfg, params, images)

    assert re.search(contiguous_dot, program(None))
    assert re.search(contiguous_dot, program("2x1"))
    assert not re.search(contiguous_dot, program("1x2"))
    with pytest.raises(ConfigError, match="fused_layout='rows'.*'auto', 'per_head' or 'contiguous'"):
        cfg.replace(fused_layout="rows")


def test_unknown_remat_policy_fails(tiny_cfg):
    """Refused when the config is made, before any compile, naming the policies that exist."""
    with pytest.raises(ConfigError, match="remat='save_everything_please'.*nothing_saveable"):
        tiny_cfg.replace(remat="save_everything_please")


DOT_OPERANDS = re.compile(r"stablehlo\.dot_general.*:\s*\(tensor<(?:[0-9x]*x)?([a-z]\w*)>, "
                          r"tensor<(?:[0-9x]*x)?([a-z]\w*)>\)")


def dot_operand_types(cfg: ModelConfig, params, images) -> list[tuple[str, str]]:
    return DOT_OPERANDS.findall(program_text(cfg, params, images))


def test_bfloat16_output_close_to_float32(tiny2_cfg, images, random_params, forward):
    cfg32 = tiny2_cfg
    cfg16 = cfg32.replace(dtype_mm="bfloat16")
    params = random_params(cfg32)
    logits32, _ = forward(cfg32)(params, images)
    logits16, out16 = forward(cfg16)(params, images)
    assert logits16.dtype == jnp.float32 and out16["encoded"].dtype == jnp.float32
    rel = float(np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32))
    assert 0 < rel < 3e-2, rel  # close, but not bit-identical: bf16 really was used


@pytest.mark.parametrize("block", ["parallel", "sequential"])
def test_bfloat16_activations_close_to_float32_and_differentiable(block, tiny2_cfg, images, random_params,
                                                                  forward):
    cfg = tiny2_cfg.replace(block=block, dtype_mm="bfloat16")
    params = random_params(cfg)
    ref, _ = forward(cfg)(params, images)
    got, out = forward(cfg.replace(dtype_act="bfloat16"))(params, images)
    assert out["encoded"].dtype == jnp.float32  # the residual stream stays float32
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert 0 < rel < 3e-2, rel
    graphdef, _ = split_params(abstract_model(cfg.replace(dtype_act="bfloat16")))
    grads = jax.grad(lambda p: jnp.sum(apply(graphdef, p, images)[0] ** 2))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) and g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_unknown_activation_dtype_fails(tiny_cfg):
    with pytest.raises(ValueError, match="dtype_act"):
        tiny_cfg.replace(dtype_act="int8").validate()


@pytest.mark.parametrize("block", ["parallel", "sequential"])
def test_bfloat16_matmuls_take_bfloat16_inputs(block, tiny2_cfg, images, random_params):
    cfg32 = tiny2_cfg.replace(block=block)
    params = random_params(cfg32)
    types16 = dot_operand_types(cfg32.replace(dtype_mm="bfloat16"), params, images)
    types32 = dot_operand_types(cfg32, params, images)
    # patch embed; fused in/out or qkv/attn-out/mlp-in/mlp-out; attention x2; MAP head x5; classifier
    assert len(types16) >= 10
    assert all(t == ("bf16", "bf16") for t in types16), types16
    assert all(t == ("f32", "f32") for t in types32), types32


def test_bf16_backward_matmuls_take_bf16_inputs():
    """The custom VJP of layers.matmul: every dot of the gradient has bf16 operands (plain autodiff
    would multiply the f32 cotangent by bf16 operands, i.e. run f32 matmuls)."""
    import re

    from vit22b.layers import matmul

    x, w = jnp.ones((4, 5, 8)), jnp.ones((8, 2, 6))
    grad = jax.grad(lambda x, w: matmul("bnd,dhf->bnhf", x, w, "bfloat16").sum(), (0, 1))
    hlo = jax.jit(grad).lower(x, w).as_text()
    dots = re.findall(r"stablehlo.dot_general.*", hlo)
    assert dots and all("xbf16>, tensor<" in d and "-> tensor<" in d and d.count("bf16") >= 2
                        for d in dots), dots
    dx, dw = grad(x, w)
    assert dx.dtype == dw.dtype == jnp.float32
