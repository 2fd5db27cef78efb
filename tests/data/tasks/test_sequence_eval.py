"""Exact-match evaluation, and tiny models training on every generated task."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from effformer import models
from effformer.data.registry import get_dataset_spec
from effformer.data.tasks import DATASETS
from effformer.models import register
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


class _NextTokenModel(nn.Module):
    """Predicts the next input token (right at every answer position of 'copy'), or its opposite.

    The prediction is right only when ``flip`` < 0.5 (a call argument, as a scheduled one
    is) and the parameters reach the model in ``want_dtype`` (the run's compute dtype).
    """

    vocab_size: int = 13
    want_dtype: str = "float32"

    def dummy_inputs(self, batch_size: int) -> dict:
        return {"inputs": jnp.zeros((batch_size, 34), jnp.int32)}

    @nn.compact
    def __call__(self, inputs, *, train: bool = False, flip: float = 1.0):
        scale = self.param("scale", nn.initializers.ones, ())
        logits = jax.nn.one_hot(jnp.pad(inputs[:, 1:], ((0, 0), (0, 1))), self.vocab_size) * scale
        if scale.dtype != jnp.dtype(self.want_dtype):
            return -logits
        return jnp.where(flip < 0.5, logits, -logits)


@register("test_next_token_model", tiny={})
def _next_token_model(**overrides) -> nn.Module:
    """Test-only model whose exact match shows its call arguments and dtype."""
    return _NextTokenModel(**overrides)


def _next_token_config(**model_kwargs):
    from effformer.data import default_data_config
    from effformer.train import default_config

    config = default_config()
    config.model.name, config.model.tiny = "test_next_token_model", True
    config.model.kwargs = ml_collections.ConfigDict(model_kwargs)
    config.data = default_data_config("copy")
    config.task.name = "causal_lm"
    config.global_batch_size, config.num_train_steps = 8, 2
    config.progress_bar = False
    # Training passes flip=1 (wrong); evaluation must pass the eval value, 0 (right).
    config.model_schedules.flip = ml_collections.ConfigDict(
        dict(kind="fixed", value=1.0, eval_value=0.0)
    )
    return config


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_sequence_eval_passes_the_eval_schedule_values_in_the_compute_dtype(compute_dtype):
    from effformer.train.experiment import build_experiment
    from effformer.train.sequence_eval import evaluate_sequence_task

    config = _next_token_config(want_dtype=compute_dtype)
    config.compute_dtype = compute_dtype
    exp = build_experiment(config)
    params = exp.init_state().params
    buckets = evaluate_sequence_task(exp, params, "test", batch_size=512)
    assert sum(count for _, count in buckets.values()) == 512
    assert accuracies(buckets) == {length: 1.0 for length in buckets}


def test_evaluate_workdir_restores_a_run_whose_mesh_this_machine_lacks(tmp_path):
    import json

    from effformer.train import train_and_evaluate
    from effformer.train.sequence_eval import evaluate_workdir

    config = _next_token_config()
    config.num_train_steps = 1
    config.optimizer.learning_rate = 0.0  # The parameters stay right.
    train_and_evaluate(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # Trained on 4 times the devices this machine has: the mesh cannot be built here.
    saved["mesh"]["num_devices"] = 4 * jax.device_count()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    buckets = evaluate_workdir(tmp_path, "test", batch_size=512)
    assert accuracies(buckets) == {length: 1.0 for length in buckets}


def test_sequence_eval_refuses_matformer_runs_and_missing_model_state():
    from types import SimpleNamespace

    from effformer.train.sequence_eval import evaluate_sequence_task

    exp = SimpleNamespace(
        info=SimpleNamespace(splits={"test": 8}),
        task=SimpleNamespace(granularities=((32,), (64,))),
        config=ml_collections.ConfigDict(
            dict(task=dict(matformer_widths=(32, 64)), model=dict(name="m"))
        ),
        abstract_state=SimpleNamespace(model_state={"hashing": {}}),
    )
    with pytest.raises(ValueError, match=r"matformer_widths=\(32, 64\).*matformer_widths=\(\)"):
        evaluate_sequence_task(exp, {}, "test")
    exp.task.granularities = ()
    with pytest.raises(ValueError, match=r"needs model_state with the collections \['hashing'\]"):
        evaluate_sequence_task(exp, {}, "test")
