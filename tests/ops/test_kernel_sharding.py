"""Pallas kernels under a device mesh (effformer.ops.kernel_sharding), on 8 simulated CPU devices.

Each op with ``implementation="pallas"`` inside a mesh context must run its kernel
in ``shard_map`` on each device's share of the batch (the kernel's inputs in the
program have the local batch), and compute exactly what the unsplit kernel and the
float64 reference compute, forward and gradients. The kernels run in interpret mode.
"""

from __future__ import annotations

import importlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from effformer.kernels.flash_attention import BlockSizes
from effformer.ops import kernel_sharding
from effformer.ops.attention import dot_product_attention
from effformer.ops.decode_attention import decode_attention
from effformer.ops.masks import AttentionMask
from effformer.ops.selective_scan import selective_scan

attention_module = importlib.import_module("effformer.ops.attention")
scan_module = importlib.import_module("effformer.ops.selective_scan")
decode_module = importlib.import_module("effformer.ops.decode_attention")

BATCH = 8


def _mesh(data=4, fsdp=2) -> Mesh:
    return Mesh(np.asarray(jax.devices()[: data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def _in_mesh(mesh, fn):
    """fn traced with ``mesh`` as the abstract mesh, as the trainer's steps are."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def _kernel_batches(fn, *args) -> list[int]:
    """Leading dims of the first input of every pallas_call in fn's program."""
    batches = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                batches.append(eqn.invars[-1].aval.shape[0])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return batches


def test_placement_follows_the_mesh_in_context(monkeypatch):
    assert jax.device_count() == 8  # tests/conftest.py
    no_mesh = kernel_sharding.kernel_placement(BATCH)
    assert no_mesh.batch_axes == () and "8 devices and no mesh" in no_mesh.reason
    with jax.sharding.use_abstract_mesh(_mesh().abstract_mesh):
        assert kernel_sharding.kernel_placement(BATCH) == (("data", "fsdp"), None, 8)
        uneven = kernel_sharding.kernel_placement(6)
        assert uneven.batch_axes == () and "batch of 6 does not split evenly" in uneven.reason
    with jax.sharding.use_abstract_mesh(_mesh(8, 1).abstract_mesh):  # size-1 axes are skipped
        assert kernel_sharding.kernel_placement(BATCH) == (("data",), None, 8)
    explicit = jax.make_mesh(
        (4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
    )
    with jax.sharding.use_abstract_mesh(explicit.abstract_mesh):
        assert "explicit sharding" in kernel_sharding.kernel_placement(BATCH).reason
    monkeypatch.setattr(kernel_sharding.jax, "device_count", lambda: 1)
    assert kernel_sharding.kernel_placement(3) == ((), None, 1)


def test_inside_shard_map_the_kernel_is_called_directly():
    mesh = _mesh()
    seen = []

    def per_device(x):
        seen.append(kernel_sharding.kernel_placement(x.shape[0]))
        return x

    spec = PartitionSpec(("data", "fsdp"))
    jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec)(jnp.zeros((BATCH, 2)))
    assert seen == [((), None, 1)]


def _check_split_matches(fn, args, local_batch, atol):
    """fn under the mesh: kernels see the local batch; equal to fn without a mesh (1 device)."""
    mesh = _mesh()
    split = _in_mesh(mesh, fn)
    assert _kernel_batches(split, *args) and set(_kernel_batches(split, *args)) == {local_batch}
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    placed = [jax.device_put(a, sharding) if a.shape[:1] == (BATCH,) else a for a in args]
    got = jax.jit(split)(*placed)
    expected = fn(*args)  # no mesh: 8 devices, but eager on one, the kernel unsplit
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)
    return got


def test_attention_kernel_splits_the_batch_and_matches_the_reference(x64):
    rng = np.random.default_rng(0)
    q, k, v, d_out = (jnp.asarray(rng.normal(size=(BATCH, 24, 2, 8))) for _ in range(4))
    # Segment ids given for one row ([1, L]): broadcast, then split with the batch.
    segments = jnp.asarray([[1] * 10 + [2] * 14], jnp.int32)
    mask = AttentionMask(soft_causal_ratio=0.3, q_segment_ids=segments, kv_segment_ids=segments)

    def attend_vjp(implementation):
        def run(q, k, v, d_out):
            out, vjp = jax.vjp(
                lambda q, k, v: dot_product_attention(
                    q, k, v, mask=mask, implementation=implementation,
                    pallas_block_sizes=BlockSizes(16, 16, 16, 16),
                ),
                q, k, v,
            )  # fmt: skip
            return out, vjp(d_out)

        return run

    got = _check_split_matches(attend_vjp("pallas"), (q, k, v, d_out), 1, atol=1e-12)
    reference = attend_vjp("reference")(q, k, v, d_out)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-10, rtol=0)


def test_selective_scan_kernel_splits_the_batch_and_matches_the_reference(x64):
    rng = np.random.default_rng(1)
    d, n, length = 8, 4, 12
    u, delta, z = (jnp.asarray(rng.normal(size=(BATCH, d, length))) for _ in range(3))
    A = -jnp.exp(jnp.asarray(rng.normal(size=(d, n))))
    B = jnp.asarray(rng.normal(size=(d, n)))  # time-invariant: every device gets it whole
    C = jnp.asarray(rng.normal(size=(BATCH, n, length)))  # per example: split
    D = jnp.asarray(rng.normal(size=(d,)))

    def scan_grads(implementation):
        def loss(u, delta, A, B, C):
            out, last = selective_scan(
                u, delta, A, B, C, D=D, z=z, delta_softplus=True, return_last_state=True,
                implementation=implementation,
            )  # fmt: skip
            return jnp.sum(out * u) + jnp.sum(last)

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))

    args = (u, delta, A, B, C)
    got = _check_split_matches(scan_grads("pallas"), args, 1, atol=1e-12)
    reference = scan_grads("reference")(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-10, rtol=0)


def test_decode_kernel_splits_the_batch_and_matches_the_reference():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(BATCH, 1, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(BATCH, 40, 2, 16)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([0, 1, 40, 23, 17, 16, 33, 2], jnp.int32)

    def decode(implementation, **kwargs):
        return lambda q, k, v, lengths: decode_attention(
            q, k, v, lengths, implementation=implementation, **kwargs
        )

    pallas = decode("pallas", num_splits=2, block_k=16)
    got = _check_split_matches(pallas, (q, k, v, lengths), 1, atol=1e-6)
    expected = decode("reference")(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    ("choose", "args"),
    [
        (
            lambda q: attention_module._pallas_not_chosen_reason(q, None, 0.0, 1.0),
            jax.ShapeDtypeStruct((BATCH, 1024, 2, 64), jnp.bfloat16),
        ),
        (
            lambda u: scan_module.default_implementation(u.shape[0]) != "pallas" or None,
            jax.ShapeDtypeStruct((BATCH, 16, 64), jnp.float32),
        ),
        (
            lambda q: decode_module.default_implementation(q) != "pallas" or None,
            jax.ShapeDtypeStruct((BATCH, 1, 4, 128), jnp.bfloat16),
        ),
    ],
    ids=["attention", "selective_scan", "decode"],
)
def test_automatic_choice_takes_the_kernel_on_several_gpus_only_under_a_mesh(
    monkeypatch, choose, args
):
    # On 8 GPUs (patched) the ops pick their kernel only where each device can run it
    # on its own examples; None from `choose` means the kernel is chosen.
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(scan_module, "_backend", lambda: "gpu")
    monkeypatch.setattr(decode_module, "_backend", lambda: "gpu")
    assert choose(args) is not None
    with jax.sharding.use_abstract_mesh(_mesh().abstract_mesh):
        assert choose(args) is None
