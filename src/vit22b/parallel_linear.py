"""ViT-22B's asynchronous parallel linear operation (paper Fig. 3), a.k.a. collective matmul.

A model-parallel matmul normally waits for a collective: the input activations are all-gathered
before the matmul, or its partial outputs are reduce-scattered after it. Here the collective is
cut into a ring of `k - 1` point-to-point `ppermute`s (k = size of the `model` mesh axis), each
independent of the matmul chunk computed at the same step, so that on hardware with asynchronous
collectives (TPU, GPU) the transfer of one chunk overlaps the matmul of another. On CPU the
collective-permutes run synchronously; the result is the same, only the overlap is missing.

Device i of the ring sends to device i+1 (mod k) at every step. Two variants, both per-device
code meant to run inside `jax.shard_map`, with c = D/k and f = F/k:

* `allgather_matmul`: x_local [..., c] (chunk i of the features), w_local [D, f] (column block i).
  Step s: device i holds chunk (i - s) mod k, adds chunk @ w_local[rows of that chunk] to its
  [..., f] accumulator, and (except at the last step) passes the chunk on. After k steps it has
  all_gather(x) @ w_local without ever holding the gathered x.
* `matmul_reducescatter`: z_local [..., f], w_local [f, D]. Step s: device i computes the partial
  product for output block b = (i - s - 1) mod k, z_local @ w_local[:, block b] ([..., c]), and
  adds it to the partial sum for block b received from device i-1 (which, one step earlier,
  summed its own and its predecessors' contributions to the same block). At the last step
  b = i: device i holds out[..., i*c:(i+1)*c] reduced over all k devices.

`collective_matmul_in/out` and `fused_in/out_projection` wrap these in `shard_map` and take and
return global arrays. Everything is differentiable: the transpose of a ppermute is the reverse
ppermute, so the backward pass of either variant is again a ring of the other kind.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vit22b.sharding import DATA, MODEL

AnyMesh = Mesh | AbstractMesh


def _pass_on(x: jax.Array, axis_name: str, k: int) -> jax.Array:
    """Send `x` to the next device of the ring (i -> i+1 mod k); receive from the previous one."""
    return jax.lax.ppermute(x, axis_name, perm=[(j, (j + 1) % k) for j in range(k)])


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """[..., a] @ [a, b] -> [..., b], accumulated and returned in float32."""
    return jnp.einsum("...a,ab->...b", x, w, preferred_element_type=jnp.float32)


def allgather_matmul(x: jax.Array, w: jax.Array, *, axis_name: str = MODEL,
                     dtype_mm: jnp.dtype | str | None = None) -> jax.Array:
    """Per-device block of all_gather(x, features) @ w, computed chunk by chunk around the ring.

    x: [..., D/k] this device's feature chunk; w: [D, F/k] this device's column block.
    Returns [..., F/k] float32. Operands are cast to `dtype_mm` first (so the chunks travel in it).
    """
    k = jax.lax.axis_size(axis_name)
    c = x.shape[-1]
    if w.shape[0] != c * k:
        raise ValueError(f"allgather_matmul: w has {w.shape[0]} rows, expected x's chunk width {c} "
                         f"x the {k} devices of mesh axis '{axis_name}' = {c * k}")
    if dtype_mm is not None:
        x, w = x.astype(dtype_mm), w.astype(dtype_mm)
    i = jax.lax.axis_index(axis_name)
    acc = None
    for s in range(k):
        nxt = _pass_on(x, axis_name, k) if s < k - 1 else None  # in flight during this step's dot
        owner = (i - s) % k
        part = _dot(x, jax.lax.dynamic_slice_in_dim(w, owner * c, c, axis=0))
        acc = part if acc is None else acc + part  # starts from a product: no pcast'd zeros needed
        x = nxt
    return acc


def matmul_reducescatter(z: jax.Array, w: jax.Array, *, axis_name: str = MODEL,
                         dtype_mm: jnp.dtype | str | None = None) -> jax.Array:
    """Per-device block i of psum(z @ w) over D, with partial sums travelling around the ring.

    z: [..., F/k] this device's contraction chunk; w: [F/k, D] the matching row block.
    Returns [..., D/k] float32: out[..., i*D/k:(i+1)*D/k] of the full product, summed over devices.
    """
    k = jax.lax.axis_size(axis_name)
    if z.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul_reducescatter: z's last dim {z.shape[-1]} != w's rows {w.shape[0]}")
    if w.shape[1] % k:
        raise ValueError(f"matmul_reducescatter: output dim D = {w.shape[1]} is not divisible by the "
                         f"size {k} of mesh axis '{axis_name}'; pad D to a multiple of {k}")
    if dtype_mm is not None:
        z, w = z.astype(dtype_mm), w.astype(dtype_mm)
    c = w.shape[1] // k
    i = jax.lax.axis_index(axis_name)
    acc = None
    for s in range(k):
        block = (i - s - 1) % k
        part = _dot(z, jax.lax.dynamic_slice_in_dim(w, block * c, c, axis=1))
        acc = part if acc is None else _pass_on(acc, axis_name, k) + part  # f32 partial sums
    return acc


# --- shard_map-wrapped forms on global arrays ----------------------------------------------------

def _resolve_mesh(mesh: AnyMesh | None, fn: str) -> AnyMesh:
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if not mesh.axis_names:
        raise ValueError(f"{fn}: no mesh; pass mesh= or call inside `with jax.set_mesh(mesh):`")
    return mesh


def _check(fn: str, what: str, size: int, mesh: AnyMesh, axis: str | None) -> None:
    n = 1 if axis is None else mesh.shape[axis]
    if size % n:
        raise ValueError(f"{fn}: {what} = {size} is not divisible by the size {n} of mesh axis "
                         f"'{axis}'; pad it to a multiple of {n} or use a mesh whose '{axis}' axis "
                         f"divides it")


def _sharded_map(f: Callable[..., jax.Array], mesh: AnyMesh, in_specs: tuple[P, P], out_spec: P,
                 *args: jax.Array) -> jax.Array:
    """shard_map(f)(*args). Auto meshes reshard the inputs to `in_specs` implicitly; meshes with
    Explicit axes need it spelt out (`jax.reshard`)."""
    if AxisType.Explicit in mesh.axis_types:
        args = tuple(jax.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs, strict=True))
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_spec)(*args)


def _axes(mesh: AnyMesh, fn: str, axis_name: str, batch_axis: str | None) -> str | None:
    """Validate `axis_name`; return `batch_axis`, or None if the mesh has no such axis."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{fn}: mesh axes {mesh.axis_names} have no '{axis_name}' axis")
    return batch_axis if batch_axis in mesh.axis_names else None


def collective_matmul_in(x: jax.Array, w: jax.Array, mesh: AnyMesh | None = None,
                         dtype_mm: jnp.dtype | str | None = None, *, axis_name: str = MODEL,
                         batch_axis: str | None = DATA) -> jax.Array:
    """x [B, ..., D] @ w [D, F] -> [B, ..., F] float32 via `allgather_matmul`.

    Shardings: x P(batch_axis, None.., axis_name), w P(None, axis_name), output
    P(batch_axis, None.., axis_name). `batch_axis` is ignored if the mesh lacks it.
    """
    fn, mesh = "collective_matmul_in", _resolve_mesh(mesh, "collective_matmul_in")
    bax = _axes(mesh, fn, axis_name, batch_axis)
    _check(fn, "x's feature dim D", x.shape[-1], mesh, axis_name)
    _check(fn, "w's output dim F", w.shape[1], mesh, axis_name)
    _check(fn, "x's batch dim B", x.shape[0], mesh, bax)
    spec = P(bax, *[None] * (x.ndim - 2), axis_name)
    return _sharded_map(lambda x, w: allgather_matmul(x, w, axis_name=axis_name, dtype_mm=dtype_mm),
                        mesh, (spec, P(None, axis_name)), spec, x, w)


def collective_matmul_out(z: jax.Array, w: jax.Array, mesh: AnyMesh | None = None,
                          dtype_mm: jnp.dtype | str | None = None, *, axis_name: str = MODEL,
                          batch_axis: str | None = DATA) -> jax.Array:
    """z [B, ..., F] @ w [F, D] -> [B, ..., D] float32 via `matmul_reducescatter`.

    Shardings: z P(batch_axis, None.., axis_name), w P(axis_name, None), output
    P(batch_axis, None.., axis_name) (reduce-scattered over D).
    """
    fn, mesh = "collective_matmul_out", _resolve_mesh(mesh, "collective_matmul_out")
    bax = _axes(mesh, fn, axis_name, batch_axis)
    _check(fn, "z's contraction dim F", z.shape[-1], mesh, axis_name)
    _check(fn, "w's output dim D", w.shape[1], mesh, axis_name)
    _check(fn, "z's batch dim B", z.shape[0], mesh, bax)
    spec = P(bax, *[None] * (z.ndim - 2), axis_name)
    return _sharded_map(
        lambda z, w: matmul_reducescatter(z, w, axis_name=axis_name, dtype_mm=dtype_mm),
        mesh, (spec, P(axis_name, None)), spec, z, w)


def fused_in_projection(h: jax.Array, in_kernel: jax.Array, mesh: AnyMesh | None = None,
                        dtype_mm: jnp.dtype | str | None = None, *, axis_name: str = MODEL,
                        batch_axis: str | None = DATA) -> jax.Array:
    """einsum("bnd,dhf->bnhf", h, in_kernel) for the encoder's fused per-head layout.

    h [B, N, D] P(batch_axis, None, axis_name); in_kernel [D, H, F] P(None, axis_name, None);
    returns [B, N, H, F] float32, P(batch_axis, None, axis_name, None). Each device's heads
    (H/k of them, with their F columns each) form its column block w_local [D, H/k * F].
    """
    fn, mesh = "fused_in_projection", _resolve_mesh(mesh, "fused_in_projection")
    bax = _axes(mesh, fn, axis_name, batch_axis)
    _check(fn, "h's feature dim D", h.shape[-1], mesh, axis_name)
    _check(fn, "in_kernel's heads dim H", in_kernel.shape[1], mesh, axis_name)
    _check(fn, "h's batch dim B", h.shape[0], mesh, bax)
    lead = [None] * (h.ndim - 2)

    def local(h: jax.Array, w: jax.Array) -> jax.Array:  # h [b, .., D/k], w [D, H/k, F]
        y = allgather_matmul(h, w.reshape(w.shape[0], -1), axis_name=axis_name, dtype_mm=dtype_mm)
        return y.reshape(*y.shape[:-1], *w.shape[1:])  # [b, .., H/k, F]

    return _sharded_map(local, mesh, (P(bax, *lead, axis_name), P(None, axis_name, None)),
                        P(bax, *lead, axis_name, None), h, in_kernel)


def fused_out_projection(z: jax.Array, out_kernel: jax.Array, mesh: AnyMesh | None = None,
                         dtype_mm: jnp.dtype | str | None = None, *, axis_name: str = MODEL,
                         batch_axis: str | None = DATA) -> jax.Array:
    """einsum("bnhf,hfd->bnd", z, out_kernel) for the encoder's fused per-head layout.

    z [B, N, H, F] P(batch_axis, None, axis_name, None); out_kernel [H, F, D] P(axis_name, None,
    None); returns [B, N, D] float32, P(batch_axis, None, axis_name): reduce-scattered over D.
    """
    fn, mesh = "fused_out_projection", _resolve_mesh(mesh, "fused_out_projection")
    bax = _axes(mesh, fn, axis_name, batch_axis)
    _check(fn, "z's heads dim H", z.shape[-2], mesh, axis_name)
    _check(fn, "out_kernel's output dim D", out_kernel.shape[-1], mesh, axis_name)
    _check(fn, "z's batch dim B", z.shape[0], mesh, bax)
    lead = [None] * (z.ndim - 3)

    def local(z: jax.Array, w: jax.Array) -> jax.Array:  # z [b, .., H/k, F], w [H/k, F, D]
        z = z.reshape(*z.shape[:-2], -1)  # (head, f) flattened in the same order as w's rows
        return matmul_reducescatter(z, w.reshape(-1, w.shape[-1]), axis_name=axis_name,
                                    dtype_mm=dtype_mm)

    return _sharded_map(local, mesh, (P(bax, *lead, axis_name, None), P(axis_name, None, None)),
                        P(bax, *lead, axis_name), z, out_kernel)
