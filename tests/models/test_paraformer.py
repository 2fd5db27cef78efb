"""Paraformer: padding, the glancing sampler, greedy decoding, its task and a few trainer steps."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.data import create_input_pipeline
from effformer.data.tasks.speech_like import SpeechLikeFrames, register_speech_like
from effformer.models.paraformer import Paraformer, nonzero_frames
from effformer.train import default_config, sharding
from effformer.train.experiment import build_experiment
from effformer.train.paraformer_task import ParaformerTask, edit_distance
from effformer.train.state import TrainState
from effformer.train.steps import make_train_step

_MODEL = models.create("paraformer", tiny=True)  # vocab 16, 8 channels, 8 decode slots
_TINY_DATA = register_speech_like(
    SpeechLikeFrames(
        name="speech_like_test", num_tokens=13, lengths=(2, 4), frames_per_token=(1, 3), feature_dim=8,
        num_examples={"train": 32, "test": 8},
    )
)  # fmt: skip


@functools.cache
def _variables():
    """Random parameters from NumPy at the model's shapes (no compiled initialisation)."""
    shapes = jax.eval_shape(_MODEL.init, jax.random.PRNGKey(0), **_MODEL.dummy_inputs(1))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


@functools.cache
def _apply():
    return jax.jit(functools.partial(_MODEL.apply, train=False))


def _frames(seed: int, lengths=(12, 7), width=12):
    rng = np.random.default_rng(seed)
    frames = rng.normal(size=(len(lengths), width, 8)).astype(np.float32)
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    return frames, mask


def test_outputs_do_not_depend_on_padding_frames_or_slots():
    frames, mask = _frames(0)
    targets = np.array([[3, 4, 5, 2, 0, 0], [6, 7, 2, 0, 0, 0]], np.int32)
    apply, variables = _apply(), _variables()
    clean = apply(variables, frames * mask[..., None], frame_mask=mask, targets=targets)
    garbage = frames.copy()
    garbage[~mask] = 100.0
    dirty = apply(variables, garbage, frame_mask=mask, targets=targets)
    for key in ("alpha_sum", "predictions", "num_tokens"):
        np.testing.assert_array_equal(np.asarray(clean[key]), np.asarray(dirty[key]))
    real = targets != 0
    np.testing.assert_allclose(
        np.asarray(clean["logits"])[real], np.asarray(dirty["logits"])[real], atol=1e-5
    )
    # Without a mask, all-zero frames are padding.
    np.testing.assert_array_equal(np.asarray(nonzero_frames(frames * mask[..., None])), mask)
    # Greedy decoding: the count is floor(sum alpha + 0.45) capped at the slots; 0 after it.
    counts = np.minimum(np.floor(np.asarray(clean["alpha_sum"]) + 0.45), _MODEL.max_tokens)
    np.testing.assert_array_equal(np.asarray(clean["num_tokens"]), counts)
    after = np.arange(_MODEL.max_tokens)[None, :] >= counts[:, None]
    assert np.all(np.asarray(clean["predictions"])[after] == 0)
    assert clean["logits"].shape == (2, 6, 16)
    # The task scores these evaluation outputs with every metric, finite.
    task = ParaformerTask(ml_collections.ConfigDict(), _TINY_DATA.info)
    _, _, metrics = jax.jit(task.loss_and_metrics)(clean, {"targets": jnp.asarray(targets)})
    assert sorted(metrics) == [
        "cross_entropy", "length_accuracy", "loss", "quantity_loss", "sequence_accuracy",
        "token_accuracy", "token_error_rate",
    ]  # fmt: skip
    assert all(np.isfinite(float(total / count)) for total, count in metrics.values())


def test_glancing_replaces_floor_ratio_times_hamming_distance_target_positions():
    targets = jnp.asarray([[3, 4, 5, 6, 7, 2], [8, 9, 2, 0, 0, 0]])
    mask = targets != 0
    predicted = jnp.asarray([[3, 9, 9, 9, 7, 9], [9, 9, 9, 9, 9, 9]])  # distances 4 and 2
    first_logits = jax.nn.one_hot(predicted, 16) * 10.0
    acoustic = jnp.where(mask[..., None], 1.0 + jnp.zeros((2, 6, 16)), 0.0)
    variables = _variables()
    glance = jax.jit(
        lambda key, ratio: _MODEL.apply(
            variables, acoustic, first_logits, targets, mask, ratio,
            method=Paraformer._glance, rngs={"dropout": key},
        ),
        static_argnums=1,
    )  # fmt: skip
    table = np.asarray(variables["params"]["target_embedding"]["embedding"])
    seen = set()
    for seed, ratio in itertools.product(range(3), (0.5, 1.0)):
        mixed = np.asarray(glance(jax.random.PRNGKey(seed), ratio))
        glanced = np.all(mixed == table[np.asarray(targets)], axis=-1) & np.asarray(mask)
        kept = np.all(mixed == 1.0, axis=-1)
        np.testing.assert_array_equal(glanced.sum(1), np.floor(ratio * np.array([4, 2])))
        assert np.all(glanced | kept | ~np.asarray(mask))  # target or acoustic embedding
        assert np.all(mixed[~np.asarray(mask)] == 0)  # padding slots stay zero
        seen.add(tuple(np.flatnonzero(glanced[0])))
    assert len(seen) > 2  # positions are drawn at random, not fixed


def test_bad_configs_and_inputs_fail_clearly():
    def init(model, **kwargs):
        inputs = {**model.dummy_inputs(1), **kwargs}
        return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))

    with pytest.raises(ValueError, match=r"tail_threshold must be in \[0, cif_threshold=1.0\)"):
        init(_MODEL.clone(tail_threshold=1.0))
    with pytest.raises(ValueError, match="num_decoder_layers must be an int >= 1, got 0"):
        init(_MODEL.clone(num_decoder_layers=0))
    with pytest.raises(ValueError, match=r"inputs must be frames \[B, T, input_dim=8\]"):
        init(_MODEL, inputs=jnp.ones((1, 12, 5)))
    with pytest.raises(ValueError, match=r"targets must be int token ids \[B=1, N\]"):
        init(_MODEL, targets=jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"frame_mask must have shape \[B, T\] = \(1, 12\)"):
        init(_MODEL, frame_mask=jnp.ones((1, 11), bool))
    with pytest.raises(ValueError, match=r"glancing_ratio must be a number in \[0, 1\], got 2"):
        init(_MODEL, glancing_ratio=2)


def _levenshtein(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_task_metrics_and_edit_distance_against_the_textbook_recurrence():
    rng = np.random.default_rng(3)
    hypothesis = rng.integers(3, 6, size=(16, 7))
    hypothesis_mask = rng.random((16, 7)) < 0.7
    reference = rng.integers(3, 6, size=(16, 6))
    lengths = rng.integers(0, 7, size=16)
    got = jax.jit(edit_distance)(hypothesis, hypothesis_mask, reference, lengths)
    want = [
        _levenshtein(h[m], r[:n])
        for h, m, r, n in zip(hypothesis, hypothesis_mask, reference, lengths, strict=True)
    ]
    np.testing.assert_array_equal(np.asarray(got), want)

    info = SpeechLikeFrames(num_examples={"train": 4, "test": 4}).info
    task = ParaformerTask(ml_collections.ConfigDict(dict(quantity_weight=0.5)), info)
    targets = jnp.asarray([[3, 4, 2, 0], [5, 2, 0, 0]])
    logits = jax.nn.one_hot(jnp.asarray([[3, 9, 2, 0], [5, 2, 0, 0]]), 15) * 50.0
    outputs = {
        "logits": logits,
        "alpha_sum": jnp.asarray([3.5, 1.0]),
        "predictions": jnp.asarray([[3, 4, 2, 7], [9, 5, 0, 0]]),
        "num_tokens": jnp.asarray([3, 2]),
    }
    loss, weight, metrics = task.loss_and_metrics(outputs, {"targets": targets})
    value = {name: float(total / count) for name, (total, count) in metrics.items()}
    assert float(weight) == 5  # target tokens, <eos> included
    np.testing.assert_allclose(float(loss), 50.0 + 0.5 * (0.5 + 1.0), rtol=1e-5)
    assert value["token_accuracy"] == pytest.approx(4 / 5) and value["quantity_loss"] == 0.75
    # Row 0 decodes "3 4" exactly (slot 3 is past the count); row 1 "9 5" for "5": one insertion.
    assert value["token_error_rate"] == pytest.approx(1 / 3) and value["sequence_accuracy"] == 0.5
    assert value["length_accuracy"] == 1.0  # both counts equal the target lengths
    with pytest.raises(ValueError, match="glancing_ratio must be a number in"):
        ParaformerTask(ml_collections.ConfigDict(dict(glancing_ratio=1.5)), info)
    with pytest.raises(ValueError, match="needs a dataset of frames"):
        ParaformerTask(ml_collections.ConfigDict(), models.registry)  # no input_shape


def test_three_trainer_steps_give_finite_losses_and_the_metrics():
    """The trainer's own step (build_experiment, make_train_step) on the task's batches."""
    config = default_config()
    config.model.name, config.model.tiny = "paraformer", True
    config.data.name, config.task.name = "speech_like_test", "paraformer"
    config.task.glancing_ratio = 0.75
    config.global_batch_size, config.num_train_steps = 4, 3
    config.mesh.num_devices = 1
    exp = build_experiment(config)
    assert exp.model == _MODEL  # vocab_size 16 and input_dim 8 from the data
    step = make_train_step(exp)
    # The trainer's state with the NumPy-random parameters (compiling init would double the
    # test's time); the step is the trainer's own.
    params = _variables()["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=jax.jit(exp.tx.init)(params),
        ema_params=None,
        rng=jax.random.PRNGKey(0),
        model_state={},
    )
    state = jax.device_put(state, exp.state_shardings)  # as the step returns it: one compile
    pipeline = create_input_pipeline(
        config.data, split="train", global_batch_size=4, train=True, seed=0
    )
    losses = []
    for _, batch in zip(range(3), pipeline, strict=False):
        state, metrics = step(state, sharding.global_batch(batch, exp.batch_sharding))
        losses.append(float(metrics["loss"]))
    keys = {"loss", "cross_entropy", "quantity_loss", "token_accuracy", "first_pass_accuracy"}
    assert keys <= set(metrics) and np.all(np.isfinite(losses)) and int(state.step) == 3
