"""The collective (ring) matmuls of parallel_linear.py against plain matmuls, on 8 simulated CPU
devices (conftest sets XLA_FLAGS): values, gradients, output shardings, the compiled HLO's
collectives (ppermute ring instead of all-gather / reduce-scatter) and shape errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit22b.parallel_linear import (
    collective_matmul_in,
    collective_matmul_out,
    fused_in_projection,
    fused_out_projection,
)

MESH_SHAPES = [(1, 8), (2, 4), (4, 2), (8, 1)]  # (data, model); model=1 is the degenerate ring
B, N, D, F, H, HF = 8, 3, 16, 24, 8, 5  # divisible by every axis size above


@functools.cache
def make_mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def place(mesh, a, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))


# Each case: (function, global x shape, w shape, plain einsum, x spec, w spec, output spec).
CASES = {
    "in": (collective_matmul_in, (B, N, D), (D, F), "bnd,df->bnf",
           P("data", None, "model"), P(None, "model"), P("data", None, "model")),
    "out": (collective_matmul_out, (B, N, F), (F, D), "bnf,fd->bnd",
            P("data", None, "model"), P("model", None), P("data", None, "model")),
    "fused_in": (fused_in_projection, (B, N, D), (D, H, HF), "bnd,dhf->bnhf",
                 P("data", None, "model"), P(None, "model", None), P("data", None, "model", None)),
    "fused_out": (fused_out_projection, (B, N, H, HF), (H, HF, D), "bnhf,hfd->bnd",
                  P("data", None, "model", None), P("model", None, None), P("data", None, "model")),
}


def operands(case: str, mesh):
    _, xs, ws, _, xspec, wspec, _ = CASES[case]
    x, w = rand(*xs), rand(*ws, seed=1)
    return x, w, place(mesh, x, xspec), place(mesh, w, wspec)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", MESH_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_plain_matmul_and_sharding(case, shape):
    fn, _, _, eq, _, _, out_spec = CASES[case]
    mesh = make_mesh(shape)
    x, w, xg, wg = operands(case, mesh)
    y = jax.jit(lambda x, w: fn(x, w, mesh))(xg, wg)
    ref = np.einsum(eq, x.astype(np.float64), w.astype(np.float64))
    assert y.dtype == jnp.float32 and y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, out_spec), y.ndim)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_matmul_accumulates_in_f32(case):
    fn, _, _, eq, _, _, _ = CASES[case]
    mesh = make_mesh((2, 4))
    x, w, xg, wg = operands(case, mesh)
    y = jax.jit(lambda x, w: fn(x, w, mesh, jnp.bfloat16))(xg, wg)
    assert y.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, w)]
    ref = np.einsum(eq, *rounded)  # f64 reference of bf16-rounded operands
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)  # bf16 sums: ~1e-2
    assert np.abs(np.asarray(y) - np.einsum(eq, x, w)).max() > 1e-3  # the cast did happen


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gradients_match_plain(case, shape):
    fn, _, _, eq, _, _, _ = CASES[case]
    mesh = make_mesh(shape)
    x, w, xg, wg = operands(case, mesh)
    cot = rand(*np.einsum(eq, x, w).shape, seed=2)  # a random cotangent

    def loss(f):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1)))

    got = loss(lambda x, w: fn(x, w, mesh))(xg, wg)
    want = loss(lambda x, w: jnp.einsum(eq, x, w))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_mesh_from_context():
    mesh = make_mesh((2, 4))
    x, w, xg, wg = operands("fused_in", mesh)
    with jax.set_mesh(mesh):
        y = jax.jit(fused_in_projection)(xg, wg)
    np.testing.assert_allclose(np.asarray(y), np.einsum("bnd,dhf->bnhf", x, w), rtol=1e-5, atol=1e-5)


def test_explicit_axis_mesh():
    """A mesh with Explicit axes (jax.make_mesh's default) gets its inputs resharded explicitly."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    x, w = rand(B, N, H, HF), rand(H, HF, D, seed=1)
    with jax.set_mesh(mesh):
        y = jax.jit(fused_out_projection)(place(mesh, x, P("data")), w)
    np.testing.assert_allclose(np.asarray(y), np.einsum("bnhf,hfd->bnd", x, w), rtol=1e-5, atol=1e-5)
    assert y.sharding.spec == P("data", None, "model")


def test_in_scanned_remat_block_with_unsharded_inputs():
    """As the encoder would use them: both projections in a scanned, rematerialised block, the
    stacked kernels and the activations passed in unsharded (shard_map's specs reshard them)."""
    mesh, L = make_mesh((2, 4)), 2
    x, w_in, w_out = rand(B, N, D), 0.3 * rand(L, D, H, HF, seed=1), 0.3 * rand(L, H, HF, D, seed=2)

    def net(x, w_in, w_out, collective):
        def block(x, p):
            if collective:
                z = jnp.tanh(fused_in_projection(x, p[0], mesh))
                return x + fused_out_projection(z, p[1], mesh), None
            z = jnp.tanh(jnp.einsum("bnd,dhf->bnhf", x, p[0]))
            return x + jnp.einsum("bnhf,hfd->bnd", z, p[1]), None
        return jnp.sum(jax.lax.scan(jax.checkpoint(block), x, (w_in, w_out))[0] ** 2)

    got, want = (jax.jit(jax.value_and_grad(functools.partial(net, collective=c), argnums=(0, 1, 2)))(
        x, w_in, w_out) for c in (True, False))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


# --- the compiled HLO ----------------------------------------------------------------------------

INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*)")  # name, opcode, rest
BULK = re.compile(r" (all-gather|reduce-scatter|all-reduce|all-to-all)(-start)?\(")


def compiled_hlo(case: str, shape, collective: bool) -> str:
    fn, _, _, eq, xspec, wspec, out_spec = CASES[case]
    mesh = make_mesh(shape)
    x, w, xg, wg = operands(case, mesh)
    if collective:
        f = jax.jit(lambda x, w: fn(x, w, mesh))
    else:  # the plain einsum with the same input and output shardings, partitioned by GSPMD
        f = jax.jit(lambda x, w: jnp.einsum(eq, x, w, preferred_element_type=jnp.float32),
                    out_shardings=NamedSharding(mesh, out_spec))
    return f.lower(xg, wg).compile().as_text()


def entry_graph(hlo: str) -> tuple[list[tuple[str, str]], dict[str, set[str]]]:
    """(name, opcode) of the ENTRY computation's instructions in text order, and their operands.
    A fusion around a dot (the CPU backend wraps some dots in library fusions) counts as a dot."""
    bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    order, deps = [], {}
    for line in entry.splitlines():
        if m := INSTR.match(line):
            name, op, rest = m.groups()
            deps[name] = set(re.findall(r"%([\w.\-]+)", re.split("calls=|metadata=", rest)[0]))
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if op == "fusion" and called and " dot(" in bodies.get(called.group(1), ""):
                op = "dot"
            if not op.endswith("-done"):  # async pairs (GPU/TPU): list the -start only
                order.append((name, op.removesuffix("-start")))
    return order, deps


def ancestors(name: str, deps: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for d in deps.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(1, 8), (2, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_hlo_ring_of_permutes_overlaps_dots(case, shape):
    k = shape[1]
    hlo = compiled_hlo(case, shape, collective=True)
    assert not BULK.search(hlo), "the ring must replace all-gather / reduce-scatter / all-reduce"
    order, deps = entry_graph(hlo)
    dots = [n for n, op in order if op == "dot"]
    perms = [n for n, op in order if op == "collective-permute"]
    assert (len(dots), len(perms)) == (k, k - 1)
    # Overlap: every transfer has a matmul that neither feeds it nor waits for it, so an async
    # scheduler can run the two at once (on CPU permutes are synchronous; see module docstring).
    for p in perms:
        before = ancestors(p, deps)
        assert any(d not in before and p not in ancestors(d, deps) for d in dots), p
    # Staircase dependencies: all-gather ring, dot s waits for s permutes (chunk s arrives after
    # s hops) and no permute waits for a dot; reduce-scatter ring, permute s carries the sum of
    # s + 1 dots and no dot waits for a permute.
    permutes_before_dot = sorted(len(ancestors(d, deps) & set(perms)) for d in dots)
    dots_before_permute = sorted(len(ancestors(p, deps) & set(dots)) for p in perms)
    if case in ("in", "fused_in"):
        assert (permutes_before_dot, dots_before_permute) == (list(range(k)), [0] * (k - 1))
    else:
        assert (permutes_before_dot, dots_before_permute) == ([0] * k, list(range(1, k)))


@pytest.mark.parametrize("case", ["in", "fused_in"])
def test_hlo_allgather_variant_text_order_interleaves(case):
    """In the compiled schedule a permute sits between two dots. (Schedule-dependent: XLA's CPU
    scheduler happens to keep this order for the all-gather ring but hoists the independent dots
    of the reduce-scatter ring; the dependency test above is the schedule-free check.)"""
    ops = [op for _, op in entry_graph(compiled_hlo(case, (1, 8), collective=True))[0]]
    kept = [op for op in ops if op in ("dot", "collective-permute")]
    first, last = kept.index("dot"), len(kept) - 1 - kept[::-1].index("dot")
    assert "collective-permute" in kept[first:last], kept


@pytest.mark.parametrize("case", list(CASES))
def test_hlo_plain_einsum_uses_bulk_collectives(case):
    hlo = compiled_hlo(case, (2, 4), collective=False)
    assert BULK.search(hlo) and "collective-permute" not in hlo


@pytest.mark.parametrize("case", list(CASES))
def test_hlo_backward_is_a_ring_too(case):
    """The transpose of a ppermute is the reverse ppermute: the backward pass of each ring is a
    ring of the other kind, and keeps the forward ring for the weight gradient's operand. The
    only bulk collective left is shard_map's psum of the weight gradient over `data` (size 1
    here: singleton replica groups), the usual data-parallel gradient reduction."""
    fn, mesh, k = CASES[case][0], make_mesh((1, 8)), 8
    _, _, xg, wg = operands(case, mesh)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, mesh) ** 2), argnums=(0, 1)))
    hlo = grad.lower(xg, wg).compile().as_text()
    for line in filter(BULK.search, hlo.splitlines()):
        assert "all-reduce" in line and "replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}" in line
    assert [op for _, op in entry_graph(hlo)[0]].count("collective-permute") == 2 * (k - 1)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("case", "xs", "ws", "needle"), [
    ("in", (B, N, 12), (12, F), "feature dim D = 12"),
    ("in", (B, N, D), (D, 20), "output dim F = 20"),
    ("out", (B, N, 12), (12, D), "contraction dim F = 12"),
    ("out", (B, N, F), (F, 20), "output dim D = 20"),
    ("fused_in", (B, N, D), (D, 6, HF), "heads dim H = 6"),
    ("fused_out", (B, N, 6, HF), (6, HF, D), "heads dim H = 6"),
    ("in", (3, N, D), (D, F), "batch dim B = 3"),
])
def test_indivisible_shapes_raise(case, xs, ws, needle):
    fn = CASES[case][0]
    mesh = make_mesh((2, 8 // 2) if "batch" in needle else (1, 8))
    with pytest.raises(ValueError, match=needle) as e:
        fn(jnp.zeros(xs), jnp.zeros(ws), mesh)
    assert "mesh axis" in str(e.value) and "pad it to a multiple of" in str(e.value)


def test_missing_mesh_or_axis_raises():
    with pytest.raises(ValueError, match="no mesh"):
        collective_matmul_in(jnp.zeros((B, D)), jnp.zeros((D, F)))
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="no 'model' axis"):
        collective_matmul_in(jnp.zeros((B, D)), jnp.zeros((D, F)), mesh)
