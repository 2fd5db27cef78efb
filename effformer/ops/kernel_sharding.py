"""Pallas kernels under a device mesh: each device runs the kernel on its own examples.

A Pallas kernel is one opaque custom call, and jit's sharding propagation cannot
split it: with the batch sharded over several devices, jit gathers the whole batch
to every device and runs the kernel there (each device doing all the work). The ops
therefore place their kernels themselves (:func:`kernel_placement`):

* one device and no mesh: the kernel is called as it is;
* inside ``shard_map`` (every mesh axis manual): the inputs are one device's
  already, so the kernel is called as it is;
* a mesh in the trace's context (``jax.set_mesh``, or
  ``jax.sharding.use_abstract_mesh`` inside a traced function, which is what the
  trainer's steps do with their ``('data', 'fsdp')`` mesh): the kernel is wrapped in
  ``jax.shard_map`` that splits the batch axis over every mesh axis not yet manual,
  so each device runs it on ``batch / devices`` examples (:func:`call_over_batch`).
  The batch must divide over those devices;
* several devices and no mesh, a batch that does not divide, or a mesh with
  explicit-sharding axes: no placement; the ops' ``implementation=None`` then
  keeps to XLA and says why, and an explicit ``implementation="pallas"`` runs the
  kernel as jit places it.

Every op's kernel computes each example on its own (attention, the scan and decode
attention have no cross-example terms), so splitting the batch changes nothing but
where the work runs. Splitting over every free axis assumes the batch is what the mesh
splits (the trainer's two axes both split it); on a mesh with a model-parallel axis the
inputs are resharded to the batch split around the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec

Array = jax.Array


class KernelPlacement(NamedTuple):
    """Where a kernel over a batch runs: see the module docstring.

    ``batch_axes``: mesh axes to split the batch over inside ``shard_map``; ``()``
    calls the kernel directly. ``reason``: why no placement exists (``batch_axes``
    is then ``()``), or None. ``shards``: the pieces the batch is split into, each
    device's kernel seeing ``batch / shards`` examples (1 when called directly).
    """

    batch_axes: tuple[str, ...]
    reason: str | None
    shards: int = 1


def kernel_placement(batch: int) -> KernelPlacement:
    """How a kernel over ``batch`` examples runs in the current trace (module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        count = jax.device_count()
        if count == 1:
            return KernelPlacement((), None)
        return KernelPlacement(
            (),
            f"{count} devices and no mesh: jit's sharding does not split a Pallas kernel "
            "(set one with jax.set_mesh, as the trainer does, or call the op inside "
            "shard_map)",
        )
    manual = set(mesh.manual_axes)
    free = tuple(name for name in mesh.axis_names if name not in manual and mesh.shape[name] > 1)
    if not free:
        return KernelPlacement((), None)
    explicit = [name for name in free if name in set(mesh.explicit_axes)]
    if explicit:
        return KernelPlacement(
            (),
            f"mesh axes {explicit} use explicit sharding, which the kernel placement does "
            "not handle (use Auto axes, or call the op inside shard_map)",
        )
    devices = math.prod(mesh.shape[name] for name in free)
    if batch % devices:
        return KernelPlacement(
            (),
            f"the batch of {batch} does not split evenly over mesh axes {free} ({devices} devices)",
        )
    return KernelPlacement(free, None, devices)


def call_over_batch(
    kernel: Callable[..., Any],
    batched: Sequence[Array | None],
    shared: Sequence[Any] = (),
    batch_axes: tuple[str, ...] = (),
) -> Any:
    """``kernel(*batched, *shared)``, split over ``batch_axes`` (leading axis) if any.

    batched: arrays whose axis 0 is the batch (None entries pass through as None);
    every output's axis 0 must be the batch too. shared: arrays (or None) every
    device gets whole, such as weights or a scalar. With ``batch_axes == ()`` the
    kernel is called directly.
    """
    if not batch_axes:
        return kernel(*batched, *shared)
    split, whole = PartitionSpec(batch_axes), PartitionSpec()
    specs = tuple(split for _ in batched) + tuple(whole for _ in shared)
    return jax.shard_map(
        kernel,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=specs,
        out_specs=split,
        axis_names=set(batch_axes),
        # Pallas calls carry no varying-manual-axes types; every output is per example.
        check_vma=False,
    )(*batched, *shared)
