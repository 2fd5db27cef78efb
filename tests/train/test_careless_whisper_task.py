"""The careless_whisper task: weakly aligned targets, cut decoding == prefix decoding, the
speech_like token end frames, LoRA-only training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.data.tasks.speech_like import ALIGNED_DATASET, DATASET
from effformer.train.careless_whisper_task import CarelessWhisperTask, weak_targets
from effformer.train.optim import create_optimizer
from effformer.train.tasks import create_task

_EOS = 2


def _reference_targets(targets, ends, cut):
    """One row, one cut: the heard tokens, then <eos>; None where unscored."""
    labels = []
    for token, end in zip(targets, ends, strict=True):
        if token in (0, _EOS) or end > cut:
            labels.append(_EOS)
            break
        labels.append(int(token))
    return labels + [None] * (len(targets) - len(labels))


def test_weak_targets_match_a_loop():
    rng = np.random.default_rng(0)
    targets = np.zeros((3, 6), np.int32)
    ends = np.zeros((3, 6), np.int32)
    for row, length in enumerate((5, 2, 0)):
        targets[row, :length] = rng.integers(3, 9, size=length)
        targets[row, length] = _EOS
        ends[row, : length + 1] = np.cumsum(rng.integers(2, 5, size=length + 1))
    cuts = np.array([[0, 4, 9, 100], [3, 5, 7, 100], [1, 2, 3, 4]], np.int32)
    labels, weights = jax.jit(weak_targets, static_argnums=3)(targets, ends, cuts, _EOS)
    for row in range(3):
        for k in range(4):
            expected = _reference_targets(targets[row], ends[row], cuts[row, k])
            scored = [label is not None for label in expected]
            np.testing.assert_array_equal(np.asarray(weights[row, k]) > 0, scored)
            got = [int(x) for x, s in zip(labels[row, k], scored, strict=True) if s]
            assert got == [x for x in expected if x is not None]
    # The last cut hears everything: the targets themselves.
    np.testing.assert_array_equal(labels[:, 3][:2], targets[:2])


def test_speech_like_aligned_adds_token_ends_and_nothing_else():
    plain, aligned = DATASET.example("train", 5), ALIGNED_DATASET.example("train", 5)
    assert "token_ends" not in plain and sorted(aligned) == sorted([*plain, "token_ends"])
    for key in plain:
        np.testing.assert_array_equal(plain[key], aligned[key])
    _, durations, frames = DATASET.utterance("train", 5)
    length = int(plain["length"])
    np.testing.assert_array_equal(aligned["token_ends"][:length], np.cumsum(durations))
    assert aligned["token_ends"][length] == len(frames) == plain["num_frames"]
    assert np.all(aligned["token_ends"][length + 1 :] == 0)


def _task(**fields):
    config = ml_collections.ConfigDict(dict(name="careless_whisper", **fields))
    return create_task(config, ALIGNED_DATASET.info)


def test_cut_decoding_equals_decoding_the_heard_prefix_and_the_loss_scores_weak_targets():
    task = _task(num_cuts=3)
    assert isinstance(task, CarelessWhisperTask)
    model = models.create(
        "careless_whisper", tiny=True, input_dim=ALIGNED_DATASET.feature_dim,
        vocab_size=ALIGNED_DATASET.info.vocab_size,
    )  # fmt: skip
    records = [ALIGNED_DATASET.example("test", i) for i in range(2)]
    assert all(r["num_frames"] > 2 * 2 * 2 + 1 for r in records)
    batch = {k: jnp.asarray(np.stack([r[k] for r in records])) for k in records[0]}
    batch = task.prepare_batch(batch, jax.random.PRNGKey(1), train=True)
    assert batch["cut_fractions"].shape == (2, 3) and np.all(batch["cut_fractions"][:, -1] == 1)
    inputs = task.model_inputs(batch)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), **inputs)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
    prefix = 2 * 2 * 2 + 1  # the input frames of chunks 0 and 1, plus the stem's lookahead

    @jax.jit
    def run(params, inputs):
        cut = model.apply({"params": params}, **inputs)
        # The lookahead frame is read by the stem but its own encoder row is not heard.
        encoded, encoder_mask = model.apply(
            {"params": params}, inputs["inputs"][:, :prefix], inputs["frame_mask"][:, :prefix],
            method="encode",
        )  # fmt: skip
        heard = model.apply(
            {"params": params}, inputs["decoder_inputs"], encoded,
            encoder_mask.at[:, -1].set(False), method="decode",
        )  # fmt: skip
        return cut, heard

    rows = np.ceil(np.asarray(batch["num_frames"]) / 2)  # encoder frames
    chunks = np.ceil(rows / 2)  # chunks of 2
    fractions = np.stack([np.zeros(2), 1.5 / chunks, np.ones(2)], axis=1)  # chunks 0, 1, last
    cut, heard = run(params, {**inputs, "cut_fractions": jnp.asarray(fractions, jnp.float32)})
    np.testing.assert_array_equal(cut["cut_frames"][:, 1], [8, 8])
    np.testing.assert_allclose(cut["logits"][:, 1], heard, rtol=1e-5, atol=1e-5)
    loss, count, metrics = task.loss_and_metrics(cut, batch)
    labels, weights = weak_targets(batch["targets"], batch["token_ends"], cut["cut_frames"], _EOS)
    assert float(count) == float(jnp.sum(weights))
    assert set(metrics) == {"loss", "token_accuracy", "eos_accuracy"}
    np.testing.assert_array_equal(labels[:, 2], batch["targets"])  # the last cut: everything
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="num_cuts"):
        _task(num_cuts=0)


def test_trainable_modules_lora_updates_only_the_adapters():
    model = models.create("careless_whisper", tiny=True)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.dummy_inputs(1))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["params"])
    config = ml_collections.ConfigDict(
        dict(name="adamw", learning_rate=0.1, warmup_steps=0, schedule="constant",
             min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
             no_decay_names=(), grad_clip_norm=1.0, trainable_modules="lora")
    )  # fmt: skip
    tx, _ = create_optimizer(config, 10)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    for name, update in updates.items():
        moved = any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(update))
        assert moved == (name == "lora"), name
