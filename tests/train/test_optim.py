"""The optimiser factory, learning-rate schedules, weight-decay masks and model schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.train.config import default_config
from effformer.train.optim import create_optimizer, weight_decay_mask
from effformer.train.schedules import eval_kwargs, make_schedule, validate_model_schedules


def _optimizer_config(**changes):
    config = default_config().optimizer
    config.update(changes)
    return config


def test_weight_decay_mask_excludes_norms_biases_and_named_params():
    params = {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "norm": {"scale": jnp.ones(4)},
        "mixer": {
            "A_log": jnp.ones((4, 2)),
            "D": jnp.ones(4),
            "in_proj": {"kernel": jnp.ones((4, 8))},
        },
    }
    mask = weight_decay_mask(params, ("A_log", "D"))
    assert mask["dense"] == {"kernel": True, "bias": False}
    assert mask["norm"] == {"scale": False}
    assert mask["mixer"] == {"A_log": False, "D": False, "in_proj": {"kernel": True}}


def test_weight_decay_mask_excludes_per_head_attention_biases():
    # DenseGeneral's query/key/value biases are [heads, head_dim]: a bias, though 2-D.
    params = {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))}}
    assert weight_decay_mask(params, ()) == {"query": {"kernel": True, "bias": False}}


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", -1e-3),
        ("min_lr_ratio", -0.1),
        ("min_lr_ratio", 1.5),
        ("weight_decay", -0.05),
        ("grad_clip_norm", -1.0),
        ("weight_decay", float("nan")),
        ("learning_rate", float("inf")),
        ("learning_rate", 1e39),  # infinite in float32
        ("grad_clip_norm", float("inf")),
        ("eps", -1e-8),
    ],
)
def test_optimizer_numbers_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=f"config.optimizer.{field} must be a number"):
        create_optimizer(_optimizer_config(**{field: value}), 10)


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("adamw", "b1", 1.0),  # bias correction 1 - b1**t = 0: a NaN first update
        ("adamw", "b2", 1.5),
        ("lamb", "b2", -0.1),
        ("sgd", "momentum", 1.0),
        ("sgd", "momentum", -0.9),
    ],
)
def test_optimizer_decay_rates_outside_zero_one_are_refused(name, field, value):
    with pytest.raises(ValueError, match=rf"config.optimizer.{field} must be a number in \[0, 1\)"):
        create_optimizer(_optimizer_config(name=name, **{field: value}), 10)


def test_adamw_decays_only_masked_parameters():
    config = _optimizer_config(learning_rate=0.1, weight_decay=0.5, schedule="constant")
    tx, _ = create_optimizer(config, num_train_steps=10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_each_optimizer_reduces_a_quadratic(name):
    config = _optimizer_config(
        name=name, learning_rate=0.05, schedule="constant", grad_clip_norm=1.0
    )
    tx, _ = create_optimizer(config, num_train_steps=100)
    params = {"w": jnp.array([[3.0, -2.0]])}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)
    start = loss(params)
    for _ in range(30):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = jax.tree.map(jnp.add, params, updates)
    assert loss(params) < 0.5 * start


def test_learning_rate_schedules():
    _, cosine = create_optimizer(
        _optimizer_config(learning_rate=1.0, warmup_steps=10, schedule="cosine"), 110
    )
    assert float(cosine(0)) == 0.0
    np.testing.assert_allclose(float(cosine(5)), 0.5)
    np.testing.assert_allclose(float(cosine(10)), 1.0)
    np.testing.assert_allclose(float(cosine(60)), 0.5, atol=1e-6)
    np.testing.assert_allclose(float(cosine(110)), 0.0, atol=1e-6)
    _, linear = create_optimizer(
        _optimizer_config(learning_rate=1.0, schedule="linear", min_lr_ratio=0.5), 10
    )
    np.testing.assert_allclose([float(linear(s)) for s in (0, 5, 10)], [1.0, 0.75, 0.5])


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match="config.optimizer.name"):
        create_optimizer(_optimizer_config(name="adamax"), 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        create_optimizer(_optimizer_config(warmup_steps=20), 10)
    with pytest.raises(ValueError, match="config.optimizer.schedule"):
        create_optimizer(_optimizer_config(schedule="exp"), 10)


def test_model_schedules_illama_constant_and_linear():
    step = ml_collections.ConfigDict(dict(kind="constant", start=1.0, end=0.0, cutoff_epochs=2))
    linear = ml_collections.ConfigDict(dict(kind="linear", start=1.0, end=0.0, cutoff_steps=10))
    step_fn, linear_fn = make_schedule(step, steps_per_epoch=5), make_schedule(linear, 5)
    assert [float(step_fn(s)) for s in (0, 9, 10)] == [1.0, 1.0, 0.0]
    np.testing.assert_allclose([float(linear_fn(s)) for s in (0, 5, 10, 20)], [1.0, 0.5, 0.0, 0.0])
    schedules = ml_collections.ConfigDict(
        dict(
            soft_mask_ratio=dict(kind="linear", start=1.0, end=0.0, cutoff_steps=10, eval_value=0.0)
        )
    )
    assert eval_kwargs(schedules, 5, 100) == {"soft_mask_ratio": 0.0}


def test_linear_model_schedule_with_cutoff_zero_is_at_its_end_from_the_start():
    # As the "constant" kind: past the cutoff (here every step) the value is ``end``.
    linear = ml_collections.ConfigDict(dict(kind="linear", start=1.0, end=0.0, cutoff_steps=0))
    constant = ml_collections.ConfigDict(dict(kind="constant", start=1.0, end=0.0, cutoff_steps=0))
    assert [float(make_schedule(linear, 5)(s)) for s in (0, 1)] == [0.0, 0.0]
    assert [float(make_schedule(constant, 5)(s)) for s in (0, 1)] == [0.0, 0.0]
    # A fractional cutoff (epochs x steps per epoch) still interpolates over the steps.
    fractional = ml_collections.ConfigDict(
        dict(kind="linear", start=1.0, end=0.0, cutoff_epochs=0.5)
    )
    np.testing.assert_allclose([float(make_schedule(fractional, 5)(s)) for s in (0, 1, 2, 3)],
                               [1.0, 0.6, 0.2, 0.0], atol=1e-6)  # fmt: skip


def test_bad_model_schedules():
    with pytest.raises(ValueError, match="kind must be one of"):
        validate_model_schedules(ml_collections.ConfigDict(dict(r=dict(kind="cosine"))))
    with pytest.raises(ValueError, match="exactly one of cutoff_steps and cutoff_epochs"):
        validate_model_schedules(
            ml_collections.ConfigDict(dict(r=dict(kind="constant", start=1, end=0)))
        )
