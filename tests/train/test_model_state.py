"""The trainer carries, checkpoints and refits a model's variables besides "params"."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effformer.data import create_input_pipeline
from effformer.mixers.ecoformer import HASHING
from effformer.train import restore, train_and_evaluate
from effformer.train.checkpoint import Checkpointer
from effformer.train.evaluate import run_evaluation
from effformer.train.experiment import build_experiment
from effformer.train.init_from import load_source_state
from effformer.train.metric_writers import read_metrics
from effformer.train.model_state import HashRefit, check_model_collections

ECO_CHANGES = dict(
    model__name="cct_2_3x2",
    model__tiny=True,
    num_train_steps=4,
    global_batch_size=16,
    log_every_steps=1,
    model_state__hashing__every_steps=2,
    model_state__hashing__examples=4,
    model_state__hashing__iterations=3,
    model_state__hashing__top_k=2,
)


def _eco_config(make_config, **changes):
    config = make_config(**{**ECO_CHANGES, **changes})
    config.model.kwargs = dict(
        image_size=8, mixer="ecoformer", mixer_kwargs=dict(num_bits=4, num_anchors=3)
    )
    return config


def _leaves_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def eco_run(session_make_config, tmp_path_factory):
    config = _eco_config(session_make_config)
    workdir = tmp_path_factory.mktemp("eco")
    result = train_and_evaluate(config, workdir)
    return config, workdir, result


def test_ecoformer_trains_refits_and_restores(eco_run):
    config, workdir, result = eco_run
    assert result["step"] == 4 and set(result["eval"]) == {"loss", "accuracy"}
    fits = read_metrics(workdir, "model_state")
    # at_start, then before every 2nd step: steps 0 and 2 of 4.
    assert [record["step"] for record in fits] == [0, 2]
    for record in fits:
        assert -1.0 <= record["hashing_agreement_after"] <= 1.0
    exp = build_experiment(config)
    fresh = jax.device_get(exp.init_state().model_state[HASHING])
    run = restore(workdir)
    trained = jax.device_get(run.model_state[HASHING])
    assert jax.tree.structure(trained) == jax.tree.structure(fresh)
    # The fits moved the hash functions away from init's random hashing.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(fresh), strict=True)
    )
    # Evaluating the restored run with its hash functions reproduces the final evaluation.
    evaluated = run_evaluation(run.experiment, run.params, model_state=run.model_state)
    assert evaluated == result["eval"]
    with pytest.raises(ValueError, match=r"needs model_state with the collections \['hashing'\]"):
        run_evaluation(run.experiment, run.params)


def test_ecoformer_resume_is_exact(eco_run, tmp_path):
    config, straight_dir, _ = eco_run
    # Stop after 3 steps: the refit before step 2 is in the checkpoint, none is due at 3.
    train_and_evaluate(config, tmp_path, stop_after_steps=3)
    train_and_evaluate(config, tmp_path)
    straight, resumed = restore(straight_dir), restore(tmp_path)
    _leaves_equal(straight.params, resumed.params)
    _leaves_equal(straight.model_state, resumed.model_state)
    assert read_metrics(straight_dir, "model_state") == read_metrics(tmp_path, "model_state")


def test_refit_schedule():
    refit = HashRefit.__new__(HashRefit)
    refit.at_start, refit.every_steps = True, 3
    assert [s for s in range(8) if refit.due(s)] == [0, 3, 6]
    refit.at_start, refit.every_steps = False, 0
    assert not any(refit.due(s) for s in range(8))


def test_parameter_only_checkpoints_keep_their_layout(baseline_run, tmp_path):
    """A checkpoint written before TrainState had model_state still restores."""
    config, workdir, _ = baseline_run
    exp = build_experiment(config)
    checkpointer = Checkpointer(workdir)
    try:
        step, state, _ = checkpointer.restore(exp.abstract_state)
    finally:
        checkpointer.close()
    assert state.model_state == {}
    legacy = {
        name: getattr(state, name) for name in ("step", "params", "opt_state", "ema_params", "rng")
    }
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "data"))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(legacy), data=ocp.args.JsonSave({"epoch": 0})
        ),
    )
    manager.wait_until_finished()
    manager.close()
    checkpointer = Checkpointer(tmp_path)
    try:
        restored_step, restored, _ = checkpointer.restore(exp.abstract_state)
    finally:
        checkpointer.close()
    assert restored_step == step and restored.model_state == {}
    _leaves_equal(restored.params, state.params)


def test_unknown_collections_are_refused(make_config):
    class Counting(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            count = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
            count.value += 1
            return inputs

    variables = Counting().init(jax.random.PRNGKey(0), jnp.zeros((2, 3)))
    config = make_config()
    with pytest.raises(ValueError, match=r"collections \['counters'\].*can only carry"):
        check_model_collections(config, set(variables) - {"params"})
    config.model_state.hashing.examples = 64
    with pytest.raises(ValueError, match="examples=64 must be at most"):
        check_model_collections(config, {HASHING})


@pytest.mark.parametrize(
    "field, value, message",
    [("every_steps", -1, "every_steps must be an int >= 0"), ("top_k", 0, "top_k must be")],
)
def test_bad_hashing_config_fails_before_training(make_config, tmp_path, field, value, message):
    config = _eco_config(make_config, **{f"model_state__hashing__{field}": value})
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, tmp_path)


def test_init_from_copies_the_source_hash_functions(eco_run, session_make_config):
    _, source_dir, _ = eco_run
    config = _eco_config(session_make_config, init_from__workdir=str(source_dir))
    exp = build_experiment(config)
    fresh = exp.init_state()
    started = load_source_state(config, exp.model, fresh)
    source = restore(source_dir)
    _leaves_equal(started.model_state, source.model_state)
    _leaves_equal(started.params, source.params)


def _batch_norm_config(make_config, **changes):
    return make_config(model__name="test_tiny_batch_norm_classifier", num_train_steps=1, **changes)


def _first_train_batch(config) -> np.ndarray:
    pipeline = create_input_pipeline(
        config.data,
        split="train",
        global_batch_size=config.global_batch_size,
        train=True,
        seed=config.seed,
    )
    return np.asarray(next(pipeline)["inputs"], np.float64).reshape(config.global_batch_size, -1)


@pytest.mark.parametrize("devices", [1, 8])
def test_batch_norm_statistics_are_over_the_global_batch(make_config, tmp_path, devices):
    """One step from zero-mean/unit-variance running stats with momentum 0.9: the stored
    mean is 0.1 x the mean of the whole batch's pixels, on 1 device or split over 8."""
    config = _batch_norm_config(make_config, mesh__num_devices=devices)
    train_and_evaluate(config, tmp_path)
    stats = restore(tmp_path).model_state["batch_stats"]["BatchNorm_0"]
    inputs = _first_train_batch(config)
    np.testing.assert_allclose(stats["mean"], 0.1 * inputs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * inputs.var(0), rtol=1e-5, atol=1e-6)


def test_batch_norm_micro_batches_update_in_sequence(make_config, tmp_path):
    """With 2 micro-batches the running mean takes the first's mean, then the second's."""
    config = _batch_norm_config(make_config, grad_accum_steps=2)
    train_and_evaluate(config, tmp_path)
    stats = restore(tmp_path).model_state["batch_stats"]["BatchNorm_0"]
    inputs = _first_train_batch(config)
    first, second = inputs[0::2], inputs[1::2]  # example i goes to micro-batch i mod 2
    expected = 0.9 * (0.1 * first.mean(0)) + 0.1 * second.mean(0)
    np.testing.assert_allclose(stats["mean"], expected, rtol=1e-5, atol=1e-6)
