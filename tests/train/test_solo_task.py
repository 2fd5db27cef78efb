"""The ``solo_vqa`` task: answer-only loss, exact match per question, the text-only control."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.data import digits_vqa as vqa
from effformer.train.tasks import create_task


def _task(**fields):
    config = ml_collections.ConfigDict(dict(name="solo_vqa", **fields))
    return create_task(config, vqa.DATASET.info)


# One compiled loss for every test (same batch shapes): op-by-op it compiles each op.
_loss_and_metrics = jax.jit(lambda logits, batch: _task().loss_and_metrics(logits, batch))


def _batch(indices):
    records = [vqa.DATASET.example("test", i) for i in indices]
    batch = {key: np.stack([r[key] for r in records]) for key in records[0]}
    batch["mask"] = np.ones(len(indices), bool)
    return batch


def _logits_predicting(targets, wrong_at=()):
    """Logits whose argmax is ``targets``, except at the (row, position) pairs ``wrong_at``."""
    logits = np.zeros((*targets.shape, vqa.VOCAB_SIZE), np.float32)
    predicted = targets.copy()
    for row, position in wrong_at:
        predicted[row, position] = (targets[row, position] + 1) % vqa.VOCAB_SIZE
    np.put_along_axis(logits, predicted[..., None], 5.0, axis=-1)
    return jnp.asarray(logits)


def test_exact_match_needs_every_answer_token_and_counts_per_question():
    batch = _batch(range(8))  # two images x the four questions
    answer = batch["prompt_length"] - 1  # the position that predicts the answer token
    wrong = [(1, int(answer[1])), (6, int(answer[6]) + 1)]  # row 6: only its <eos> is wrong
    # Wrong predictions on the image and the question change nothing.
    wrong += [(0, 3), (2, 22), (5, 0)]
    _, count, metrics = _loss_and_metrics(_logits_predicting(batch["targets"], wrong), batch)
    assert float(count) == 16  # answer + <eos> of 8 examples
    values = {name: float(total) / float(weight) for name, (total, weight) in metrics.items()}
    assert values["exact_match"] == 6 / 8
    assert values["accuracy"] == 14 / 16
    assert values["exact_match/what_digit"] == 1.0  # rows 0, 4
    assert values["exact_match/is_even"] == 0.5  # row 1 wrong
    assert values["exact_match/greater_than_4"] == 0.5  # row 6 wrong
    assert values["exact_match/plus_k_mod_10"] == 1.0


def test_the_loss_is_the_cross_entropy_of_the_answer_tokens_only():
    batch = _batch(range(8))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, vqa.ROW_LENGTH, vqa.VOCAB_SIZE)).astype(np.float32)
    loss, count, _ = _loss_and_metrics(jnp.asarray(logits), batch)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = 0.0
    for row in range(8):
        for position in (batch["prompt_length"][row] - 1, batch["prompt_length"][row]):
            expected -= log_probs[row, position, batch["targets"][row, position]]
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(count) == 16
    # A masked (padding) row counts nothing.
    batch["mask"][3] = False
    _, count, metrics = _loss_and_metrics(jnp.asarray(logits), batch)
    assert float(count) == 14 and float(metrics["exact_match"][1]) == 7


def test_model_inputs_overrides_and_the_text_only_control():
    batch = _batch(range(2))
    task = _task()
    inputs = task.model_inputs(batch)
    assert sorted(inputs) == ["inputs", "patch_indices", "patches"]
    np.testing.assert_array_equal(inputs["patches"], batch["patches"])
    assert task.model_overrides() == {"vocab_size": 31, "patch_size": 4, "num_channels": 1}
    control = _task(zero_patches=True).model_inputs(batch)
    assert not np.asarray(control["patches"]).any() and batch["patches"].any()
    np.testing.assert_array_equal(control["patch_indices"], batch["patch_indices"])
    with pytest.raises(ValueError, match="zero_patches must be a bool"):
        _task(zero_patches=1)
    with pytest.raises(ValueError, match="matformer_widths must be"):
        _task(matformer_widths=(0.5, 1.0))
