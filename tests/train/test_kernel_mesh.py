"""The trainer's steps run Pallas kernels on each device's own examples (ops.kernel_sharding)."""

import jax
import jax.extend
import jax.numpy as jnp

from effformer.train.experiment import build_experiment
from effformer.train.steps import make_eval_step, make_train_step


def _kernel_batches(traced) -> list[int]:
    """Leading dim of the query input of every pallas_call in a traced step."""
    batches = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                # flash attention's inputs: schedules, (ratio), q, k, v, ...: q is [B, L, H, D].
                batches.append(next(v.aval.shape[0] for v in eqn.invars if v.aval.ndim == 4))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(traced.jaxpr.jaxpr)
    return batches


def test_train_and_eval_steps_split_the_batch_over_the_mesh_around_kernels(make_config):
    # 8 devices, global batch 32: each kernel call in the steps sees 4 examples. Without
    # the mesh in the trace, jit would hand every device all 32 (the custom call is opaque).
    config = make_config(model__name="vit_digits", model__tiny=True)
    config.model.kwargs.attention_implementation = "pallas"
    exp = build_experiment(config)
    assert exp.mesh.size == 8
    batch = {
        "inputs": jax.ShapeDtypeStruct((32, 8, 8, 1), jnp.float32),
        "label": jax.ShapeDtypeStruct((32,), jnp.int32),
    }
    train = make_train_step(exp).trace(exp.abstract_state, batch)
    batches = _kernel_batches(train)
    # Forward, and the dq and dk/dv kernels of the backward, each split to 4 examples.
    assert len(batches) >= 3 and set(batches) == {4}, batches
    state = exp.abstract_state
    evaluate = make_eval_step(exp, {}).trace(state.params, state.model_state, batch)
    assert set(_kernel_batches(evaluate)) == {4}
