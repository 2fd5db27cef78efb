"""Pieces shared by the Mosaic GPU kernels: WGMMA products, layouts and their interpreted forms.

The kernels run on a Hopper GPU and, for tests, in Mosaic GPU's interpreter on CPU
(``interpret=True``), which simulates shared memory, the TMA copies and the barriers
but has no rule for WGMMA with an operand in registers, for transposed shared-memory
views or for register-layout casts. Each helper here therefore has two forms, chosen
by ``interpret``: the GPU one (WGMMA into a ``run_scoped`` accumulator, layouts fixed
for the compiler) and an interpreted one computing the same values with plain dots
and no layout. Only the GPU forms are lowered (checked from the CPU host with
``lowering_platforms=("cuda",)``); only the interpreted ones run on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

Array = jax.Array

# WGMMA computes 64-row tiles per warpgroup; a 128-byte swizzle holds 64 16-bit elements.
TILE_ROWS = 64


def interpret_params(interpret: bool):
    """The ``interpret`` argument of ``plgpu.kernel``: Mosaic GPU's interpreter, or None."""
    if not interpret:
        return None
    # Private in the pinned jax (0.10.2), hence imported only when asked for.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def tile_transforms(dtype) -> tuple:
    """Tiling and 128-byte swizzle of a [rows, columns] shared-memory tile (what WGMMA reads)."""
    swizzle = 128
    elements = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elements)), plgpu.SwizzleTransform(swizzle))


def with_layout(interpret: bool, x: Array, layout) -> Array:
    """x with a register layout fixed for the GPU (a loop carry needs one)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def iota(interpret: bool, shape: tuple[int, int], dimension: int) -> Array:
    """int32 indices along ``dimension`` in the WGMMA accumulator's register layout."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dimension)
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def vector(interpret: bool, vector_smem, layout) -> Array:
    """A vector from shared memory in the register layout it is broadcast from."""
    return vector_smem[...] if interpret else plgpu.load(vector_smem, (), layout=layout)


def matmul_transposed(interpret: bool, a_smem, b_smem) -> Array:
    """a b^T ([rows_a, rows_b] float32) of two tiles in shared memory."""
    if interpret:
        return lax.dot_general(
            a_smem[...], b_smem[...], (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )  # fmt: skip

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), jnp.float32))


def matmul_registers(interpret: bool, a: Array, b_smem) -> Array:
    """a b ([rows_a, columns_b] float32): a in registers (WGMMA layout), b in shared memory."""
    if interpret:
        return jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((a.shape[0], b_smem.shape[1]), jnp.float32))
