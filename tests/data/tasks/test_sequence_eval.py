"""Exact-match evaluation, and tiny models training on every generated task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effformer import models
from effformer.data.registry import get_dataset_spec
from effformer.data.tasks import DATASETS
from effformer.train.sequence_eval import (
    accuracies,
    answer_exact_match,
    bucket_by_length,
    exact_match_by_length,
)


def test_answer_exact_match_on_hand_made_predictions():
    targets = np.array([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 7, 0], [1, 1, 1, 1]])
    weights = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    predictions = np.array(
        [
            [9, 6, 7, 3],  # right wherever scored; unscored positions do not count
            [5, 6, 8, 0],  # one answer token wrong
            [5, 2, 7, 0],  # the other one wrong
            [1, 1, 1, 1],  # nothing scored: not an answer
        ]
    )
    np.testing.assert_array_equal(
        answer_exact_match(predictions, targets, weights), [True, False, False, False]
    )
    with pytest.raises(ValueError, match=r"one shape \[B, L\]"):
        answer_exact_match(predictions[:, :3], targets, weights)


def test_bucket_by_length():
    correct = np.array([True, False, True, True, False])
    lengths = np.array([3, 3, 5, 5, 9])
    mask = np.array([True, True, True, True, False])
    buckets = bucket_by_length(correct, lengths, mask)
    assert buckets == {3: (1, 2), 5: (2, 2)}
    assert accuracies(buckets) == {3: 0.5, 5: 1.0}
    with pytest.raises(ValueError, match="1-D of one shape"):
        bucket_by_length(correct, lengths[:4])


def test_exact_match_by_length_with_a_perfect_and_a_wrong_model():
    data = get_dataset_spec("reverse").generated
    batch = {key: np.stack([data.example("test_long", i)[key] for i in range(16)])
             for key in ("targets", "weights", "length")}  # fmt: skip
    batch["mask"] = np.ones(16, bool)
    vocab = len(data.vocabulary)
    perfect = exact_match_by_length(lambda b: jax.nn.one_hot(b["targets"], vocab), [batch])
    assert accuracies(perfect) == {length: 1.0 for length in range(9, 17)}
    assert sum(count for _, count in perfect.values()) == 16
    # Wrong at the last answer token (<eos>) only: no answer is an exact match.
    shifted = np.where(batch["targets"] == 2, 3, batch["targets"])
    wrong = exact_match_by_length(lambda b: jax.nn.one_hot(shifted, vocab), [batch])
    assert all(right == 0 for right, _ in wrong.values())


# Every dataset, padded to one row length and vocabulary, so one compiled step serves all.
_ROW = max(get_dataset_spec(n).generated.info.input_shape[0] for n in DATASETS)
_VOCAB = max(get_dataset_spec(n).generated.info.vocab_size for n in DATASETS)


def _padded_batch(name, size=4):
    data = get_dataset_spec(name).generated
    examples = [data.example("train", i) for i in range(size)]
    pad = _ROW - data.info.input_shape[0]
    return {
        key: np.stack([np.pad(e[key], (0, pad)) for e in examples])
        for key in ("inputs", "targets", "weights")
    }


def test_a_tiny_decoder_trains_on_every_task():
    model = models.create("lm_decoder", tiny=True, vocab_size=_VOCAB, num_layers=1, max_length=_ROW)
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1))["params"]
    # Adam's first step moves every parameter by about the learning rate: 1e-3 is small
    # against the 0.02-std weights, so one step descends (1e-2 moved them by half their
    # scale and could overshoot, as it did on 'reverse').
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(params):
            logits = model.apply({"params": params}, batch["inputs"])
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(losses * batch["weights"]) / jnp.sum(batch["weights"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for name in sorted(DATASETS):
        batch = _padded_batch(name)
        opt_state = tx.init(params)  # Fresh moments: the first step then descends on this batch.
        losses = []
        for _ in range(2):
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
        assert np.all(np.isfinite(losses)), name
        assert losses[-1] < losses[0], (name, losses)  # Fits its own batch: the loss is wired.


def test_trainer_runs_a_task_and_the_workdir_evaluates(tmp_path):
    # The seq2seq format goes through the same pipeline; the decoder path suffices here.
    dataset, model, task = "copy", "lm_decoder", "causal_lm"
    from effformer.data import default_data_config, get_dataset_info
    from effformer.train import default_config, train_and_evaluate
    from effformer.train.sequence_eval import evaluate_workdir

    config = default_config()
    config.model.name, config.model.tiny = model, True
    config.data = default_data_config(dataset)
    config.task.name = get_dataset_info(config.data).task
    assert config.task.name == task
    config.global_batch_size, config.num_train_steps = 8, 2
    config.mesh.num_devices, config.progress_bar = 1, False
    result = train_and_evaluate(config, tmp_path)
    assert np.isfinite(result["eval"]["loss"])
    buckets = evaluate_workdir(tmp_path, "test_long", batch_size=256)
    assert sorted(buckets) == list(range(9, 17))
    assert sum(count for _, count in buckets.values()) == 512
