"""What the compiled-kernel test files (test_kernels_on_gpu.py, test_kernels_on_tpu.py) share.

Not a test module: the inputs and the error measure of their checks against float64
references, so that the GPU and the TPU kernels are held to the same comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effformer.ops.selective_scan import selective_scan


def relative_errors(actual, expected) -> list[float]:
    """max |actual - expected| / max |expected| per leaf of two matching pytrees."""
    return [
        float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() / np.abs(b).max())
        for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ]


def scan_inputs(d: int, n: int, length: int, B_shape, C_shape) -> dict[str, jax.Array]:
    """The selective-scan op's float32 arguments for batch 2 (A negative, delta_bias < 0)."""
    rng = np.random.default_rng(1)
    normal = lambda *shape: rng.normal(size=shape)  # noqa: E731
    arrays = dict(
        u=normal(2, d, length),
        delta=normal(2, d, length) * 0.5 - 2.0,
        A=-np.exp(normal(d, n)),
        B=normal(*B_shape),
        C=normal(*C_shape),
        D=normal(d),
        z=normal(2, d, length),
        delta_bias=rng.uniform(-4.0, -2.0, size=d),
    )
    return {name: jnp.asarray(value, jnp.float32) for name, value in arrays.items()}


def scan_outputs_and_gradients(implementation: str, mask):
    """args -> ((out, last state), gradients of every argument) of the op as Mamba calls it.

    The loss weighs out by z and the state by A, so no cotangent is all ones.
    """

    def forward(args):
        return selective_scan(
            **args,
            delta_softplus=True,
            return_last_state=True,
            mask=mask,
            implementation=implementation,
        )

    def loss(args):
        out, state = forward(args)
        return jnp.sum(out * args["z"]) + jnp.sum(state * args["A"])

    return lambda args: (forward(args), jax.grad(loss)(args))
