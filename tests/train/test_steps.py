"""The jitted train and eval steps (effformer.train.steps)."""

import jax
import jax.numpy as jnp
import pytest

from effformer.train.experiment import build_experiment
from effformer.train.steps import make_eval_step, make_train_step


@pytest.mark.parametrize("which", ["train", "eval"])
def test_bfloat16_casts_the_model_inputs_but_not_the_loss_targets(make_config, which):
    # Regression: the steps cast the WHOLE batch to bfloat16, so the loss read label-smoothed
    # (or mixed) targets, a teacher's logits and float weights rounded to 8 bits of mantissa
    # (0.91 -> 0.91015625), although the tasks compute the loss in float32 and
    # ARCHITECTURE.md promises that only the parameters and the float inputs are cast.
    exp = build_experiment(
        make_config(compute_dtype="bfloat16", task__label_smoothing=0.1, global_batch_size=8)
    )
    seen = {}
    task = exp.task
    loss_and_metrics = task.loss_and_metrics

    def recording(outputs, batch):
        seen.update(outputs=outputs.dtype, targets=batch["targets"].dtype)
        return loss_and_metrics(outputs, batch)

    task.loss_and_metrics = recording  # an instance attribute: this experiment's task only
    batch = {
        "inputs": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32),
        "label": jax.ShapeDtypeStruct((8,), jnp.int32),
    }
    state = exp.abstract_state
    if which == "train":
        jax.eval_shape(make_train_step(exp), state, batch)
    else:
        jax.eval_shape(make_eval_step(exp, {}), state.params, state.model_state, batch)
    assert seen == {"outputs": jnp.bfloat16, "targets": jnp.float32}


def test_the_cast_leaves_python_numbers_and_integer_arrays_alone():
    # The steps cast the model's inputs, which may hold Python numbers (Paraformer's
    # glancing_ratio, MatFormer's ffn_granularities): they have no dtype to cast.
    from effformer.train.steps import cast_floats

    cast = cast_floats(
        {"x": jnp.ones(2), "tokens": jnp.ones(2, jnp.int32), "ratio": 0.75, "widths": (0.5, 1.0)},
        jnp.bfloat16,
    )
    assert cast["x"].dtype == jnp.bfloat16 and cast["tokens"].dtype == jnp.int32
    assert cast["ratio"] == 0.75 and cast["widths"] == (0.5, 1.0)
