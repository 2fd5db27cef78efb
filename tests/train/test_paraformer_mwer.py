"""Paraformer's MWER loss with negative sampling (effformer/train/paraformer_task.py).

Checked against a float64 loop written from the definition (candidates: the
greedy token masked out and the argmax taken again where a flip is drawn;
loss: sum_i P_hat_i * (W_i - mean W)), forward and gradient; the properties:
equal error counts give a zero loss and gradient, a gradient step moves
probability to the candidates with fewer errors, and the task adds the term
only in training with ``mwer_weight > 0``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.data.tasks.speech_like import SpeechLikeFrames
from effformer.train.paraformer_task import (
    ParaformerTask,
    mwer_loss,
    negative_sampling_candidates,
)


def _reference_loss(logits, flips, targets, slot_mask):
    """Loops in float64: the candidates and the MWER loss per utterance."""
    logits = np.asarray(logits, np.float64)
    b, n, slots = flips.shape
    losses, all_candidates = [], np.zeros(flips.shape, np.int64)
    for row in range(b):
        log_p = logits[row] - np.log(np.exp(logits[row]).sum(-1, keepdims=True))
        sequence_log_p, errors = [], []
        for i in range(n):
            total, wrong = 0.0, 0
            for t in range(slots):
                scores = log_p[t].copy()
                if flips[row, i, t]:
                    scores[np.argmax(scores)] = -np.inf  # the greedy token masked out
                token = int(np.argmax(scores))
                all_candidates[row, i, t] = token
                if slot_mask[row, t]:
                    total += log_p[t, token]
                    wrong += int(token != targets[row, t])
            sequence_log_p.append(total)
            errors.append(wrong)
        p = np.exp(np.asarray(sequence_log_p) - max(sequence_log_p))
        p /= p.sum()
        errors = np.asarray(errors, np.float64)
        losses.append(float(np.sum(p * (errors - errors.mean()))))
    return np.asarray(losses), all_candidates


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 5, 6)) * 2.0
    flips = rng.random((3, 4, 5)) < 0.5
    targets = rng.integers(3, 6, size=(3, 5))
    slot_mask = np.arange(5)[None, :] < np.asarray([5, 3, 4])[:, None]
    return logits, flips, targets, slot_mask


def test_candidates_loss_and_gradient_equal_the_float64_loop(x64):
    logits, flips, targets, slot_mask = _problem()
    want, want_candidates = _reference_loss(logits, flips, targets, slot_mask)
    candidates = negative_sampling_candidates(jnp.asarray(logits), jnp.asarray(flips))
    np.testing.assert_array_equal(np.asarray(candidates), want_candidates)

    def loss(x):
        return mwer_loss(x, candidates, jnp.asarray(targets), jnp.asarray(slot_mask))

    np.testing.assert_allclose(loss(jnp.asarray(logits)), want, rtol=1e-6, atol=1e-7)
    # The gradient of the summed loss against central differences of the loop (the
    # candidates fixed, as the loss treats them).
    grad = np.asarray(jax.grad(lambda x: jnp.sum(loss(x)))(jnp.asarray(logits)))
    eps = 1e-6
    for index in itertools.islice(np.ndindex(logits.shape), 0, None, 7):
        up, down = logits.copy(), logits.copy()
        up[index] += eps
        down[index] -= eps
        numeric = (
            np.sum(_fixed_candidate_loss(up, want_candidates, targets, slot_mask))
            - np.sum(_fixed_candidate_loss(down, want_candidates, targets, slot_mask))
        ) / (2 * eps)
        np.testing.assert_allclose(grad[index], numeric, rtol=1e-5, atol=1e-8)


def _fixed_candidate_loss(logits, candidates, targets, slot_mask):
    """The loss of given candidates, in float64 loops (for finite differences)."""
    losses = []
    for row in range(logits.shape[0]):
        log_p = logits[row] - np.log(np.exp(logits[row]).sum(-1, keepdims=True))
        scored = slot_mask[row]
        seq = np.asarray([log_p[scored, c[scored]].sum() for c in candidates[row]])
        errors = np.asarray([np.sum(c[scored] != targets[row][scored]) for c in candidates[row]])
        p = np.exp(seq - seq.max())
        p /= p.sum()
        losses.append(np.sum(p * (errors - errors.mean())))
    return np.asarray(losses)


def test_equal_error_counts_give_no_loss_and_a_step_favours_fewer_errors():
    logits, flips, targets, slot_mask = _problem(1)
    candidates = negative_sampling_candidates(jnp.asarray(logits), jnp.asarray(flips))
    targets, slot_mask = jnp.asarray(targets), jnp.asarray(slot_mask)
    # Against a target no candidate can emit (an id past the vocabulary of 6) every
    # candidate has the same number of errors.
    never = jnp.full_like(targets, 99)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(mwer_loss(x, candidates, never, slot_mask)))(
        jnp.asarray(logits, jnp.float32)
    )
    assert float(value) == 0.0 and float(jnp.abs(grad).max()) == 0.0

    def expected_errors(x):
        scored = slot_mask[:, None, :]
        log_p = jax.nn.log_softmax(x, -1)
        seq = jnp.sum(
            jnp.take_along_axis(log_p[:, None], candidates[..., None], -1)[..., 0] * scored, -1
        )
        errors = jnp.sum((candidates != targets[:, None]) * scored, -1)
        return jnp.sum(jax.nn.softmax(seq, 1) * errors)

    x = jnp.asarray(logits, jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(mwer_loss(x, candidates, targets, slot_mask)))(x)
    assert float(expected_errors(x - 0.05 * grad)) < float(expected_errors(x))


def test_the_task_adds_the_term_only_in_training_with_a_weight():
    info = SpeechLikeFrames(num_examples={"train": 4, "test": 4}).info
    logits, _, targets, _ = _problem(2)
    targets = jnp.asarray(np.where(np.arange(5) < 4, targets, 0))  # last slot padding
    batch = {"targets": targets}
    outputs = {"logits": jnp.asarray(logits, jnp.float32), "alpha_sum": jnp.full((3,), 4.0)}
    plain = ParaformerTask(ml_collections.ConfigDict(), info)
    task = ParaformerTask(ml_collections.ConfigDict(dict(mwer_weight=0.5, mwer_hypotheses=3)), info)
    assert "mwer_flips" not in task.prepare_batch(batch, jax.random.PRNGKey(0), train=False)
    assert "mwer_flips" not in plain.prepare_batch(batch, jax.random.PRNGKey(0), train=True)
    prepared = task.prepare_batch(batch, jax.random.PRNGKey(0), train=True)
    assert prepared["mwer_flips"].shape == (3, 3, 5)
    base, _, _ = plain.loss_and_metrics(outputs, prepared)  # plain ignores the flips' term
    loss, tokens, metrics = task.loss_and_metrics(outputs, prepared)
    candidates = negative_sampling_candidates(outputs["logits"], prepared["mwer_flips"])
    per_utterance = mwer_loss(outputs["logits"], candidates, targets, targets != 0)
    np.testing.assert_allclose(loss, base + 0.5 * jnp.sum(per_utterance), rtol=1e-6)
    np.testing.assert_allclose(metrics["mwer_loss"][0], jnp.sum(per_utterance), rtol=1e-6)
    assert float(tokens) == 12.0


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("mwer_weight", -1.0, "mwer_weight must be a number >= 0"),
        ("mwer_hypotheses", 1, "mwer_hypotheses must be an int >= 2"),
        ("mwer_hypotheses", 2.5, "mwer_hypotheses must be an int >= 2"),
    ],
)
def test_bad_mwer_settings_are_refused(field, value, match):
    info = SpeechLikeFrames(num_examples={"train": 4, "test": 4}).info
    with pytest.raises(ValueError, match=match):
        ParaformerTask(ml_collections.ConfigDict({field: value}), info)
    with pytest.raises(ValueError, match=r"flips \[b, n, N\]"):
        negative_sampling_candidates(jnp.zeros((2, 3, 4)), jnp.zeros((2, 2, 4), bool))
