"""Device mesh and shardings.

The mesh has two axes: ``data`` (batch split, parameters replicated) and
``fsdp`` (batch split AND parameters split along their largest divisible
dimension). The same code runs on 1 CPU, 8 simulated CPU devices, a GPU or a
TPU slice; ``jax.distributed.initialize`` is called first for multi-host runs.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def create_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """A ('data', 'fsdp') mesh over the devices the config selects (``config`` is ``config.mesh``)."""
    devices = jax.devices()
    count = config.num_devices
    # A negative count would slice from the end (devices[:-1]: all but one) without a word.
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(
            f"config.mesh.num_devices must be an int >= 0 (0: every device), got {count!r}."
        )
    if config.num_devices:
        if config.num_devices > len(devices):
            raise ValueError(
                f"config.mesh.num_devices={config.num_devices} but only {len(devices)} devices exist."
            )
        devices = devices[: config.num_devices]
    fsdp = int(config.fsdp)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(
            f"config.mesh.fsdp must divide the device count {len(devices)}, got {fsdp}."
        )
    data = len(devices) // fsdp if config.data == -1 else int(config.data)
    if data * fsdp != len(devices):
        raise ValueError(
            f"config.mesh.data * config.mesh.fsdp must equal the device count {len(devices)}, "
            f"got {data} * {fsdp}; set config.mesh.data=-1 to use every device."
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree of ShapeDtypeStructs: replicated, or FSDP along the largest divisible dim.

    Optimizer moments have the shapes of the parameters, so one shape-based
    rule gives matching shardings to both.
    """
    fsdp = mesh.shape["fsdp"]

    def rule(leaf: Any) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        if fsdp == 1 or not shape:
            return replicated(mesh)
        candidates = [axis for axis, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
        if not candidates:
            return replicated(mesh)
        axis = max(candidates, key=lambda a: shape[a])
        spec = [None] * len(shape)
        spec[axis] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(rule, abstract_state)


def global_batch(
    local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Assemble each host's part of the batch into global arrays split over the mesh."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
