"""Distillation from a decoder-only teacher into an encoder-decoder student.

The aligned teacher logits against the teacher run on every prefix by itself, the
loss against float64 by hand, w = 0 against the seq2seq task, refused configs, and
one trainer run of teacher and student.
"""

import importlib
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.train.seq2seq_distillation import (
    aligned_teacher_logits,
    distillation_token_loss,
    teacher_sequence,
)
from effformer.train.tasks import create_task

VOCAB = 12
SEP = 1
INFO = types.SimpleNamespace(vocab_size=VOCAB)


def _task(name="seq2seq_distillation", info=INFO, **fields):
    config = ml_collections.ConfigDict(
        dict(name=name, distill_temperature=1.0, distill_weight=1.0, matformer_widths=())
    )
    config.update(fields)
    return create_task(config, info)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _rows():
    """Right-padded sources of lengths 3, 5, 1 and targets of lengths 4, 2, 3 (0 = padding)."""
    rng = np.random.default_rng(0)
    inputs = np.zeros((3, 5), np.int32)
    targets = np.zeros((3, 4), np.int32)
    for row, (n, m) in enumerate([(3, 4), (5, 2), (1, 3)]):
        inputs[row, :n] = rng.integers(3, VOCAB, n)
        targets[row, :m] = rng.integers(2, VOCAB, m)
    return inputs, targets


def test_teacher_row_is_the_causal_lm_row():
    inputs, targets = _rows()
    tokens, lengths = teacher_sequence(jnp.asarray(inputs), jnp.asarray(targets), sep_id=SEP)
    np.testing.assert_array_equal(lengths, [3, 5, 1])
    for row, n in enumerate([3, 5, 1]):
        target = targets[row][targets[row] != 0]
        expected = np.zeros(5 + 1 + 4, np.int32)
        expected[: n + 1 + len(target)] = [*inputs[row, :n], SEP, *target]
        np.testing.assert_array_equal(tokens[row], expected)


def test_aligned_logits_equal_the_teacher_on_each_prefix():
    """Output t of row i is the teacher's next-token logits after source, <sep>, y_1..y_t."""
    teacher = models.create("lm_decoder", tiny=True, vocab_size=VOCAB)
    params = jax.jit(teacher.init)(jax.random.PRNGKey(1), **teacher.dummy_inputs(1))
    inputs, targets = _rows()
    tokens, lengths = teacher_sequence(jnp.asarray(inputs), jnp.asarray(targets), sep_id=SEP)

    # The reference: every prefix as its own row, followed by random tokens that a
    # causal teacher must not see; the logits at the prefix's last token.
    rng = np.random.default_rng(1)
    width = 5 + 1 + 4
    prefixes, last = [], []
    for row, n in enumerate([3, 5, 1]):
        for t in range(targets.shape[1]):
            prefix = [*inputs[row, :n], SEP, *targets[row, :t]]
            padded = rng.integers(0, VOCAB, width)
            padded[: len(prefix)] = prefix
            prefixes.append(padded)
            last.append(len(prefix) - 1)
    # One forward pass over the task's rows and the prefixes (one compilation).
    logits = jax.jit(teacher.apply)(
        params, jnp.concatenate([tokens, jnp.asarray(np.stack(prefixes))])
    )
    row_logits, prefix_logits = logits[:3], np.asarray(logits[3:])
    aligned = aligned_teacher_logits(row_logits, lengths, targets.shape[1])
    expected = prefix_logits[np.arange(len(last)), last].reshape(3, 4, VOCAB)
    assert aligned.shape == (3, 4, VOCAB)
    np.testing.assert_allclose(aligned, expected, rtol=1e-5, atol=1e-5)
    # Off by one in either direction is a different array.
    for shift in (-1, 1):
        shifted = aligned_teacher_logits(row_logits, lengths + shift, 4)
        assert not np.allclose(shifted, expected, atol=1e-3)


def _loss_batch(seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, VOCAB, (3, 4)).astype(np.int32)
    targets[0, 3:] = 0
    targets[2, 1:] = 0
    batch = {
        "inputs": jnp.asarray(rng.integers(1, VOCAB, (3, 5)), jnp.int32),
        "targets": jnp.asarray(targets),
        "teacher_logits": jnp.asarray(rng.normal(size=(3, 4, VOCAB)) * 2, jnp.float32),
        "mask": jnp.asarray([True, True, False]),
    }
    logits = jnp.asarray(rng.normal(size=(3, 4, VOCAB)) * 2, jnp.float32)
    return batch, logits


def test_loss_equals_float64_hand_computation():
    w, temperature = 0.3, 2.0
    task = _task(distill_weight=w, distill_temperature=temperature)
    batch, logits = _loss_batch()
    batch = task.prepare_batch(batch, jax.random.PRNGKey(0), train=True)
    loss_sum, weight, metrics = task.loss_and_metrics(logits, batch)

    student, teacher = (
        np.asarray(logits, np.float64),
        np.asarray(batch["teacher_logits"], np.float64),
    )
    targets = np.asarray(batch["targets"])
    weights = (targets != 0) * np.array([1.0, 1.0, 0.0])[:, None]
    expected, kl_total = 0.0, 0.0
    for i in range(3):
        for t in range(4):
            if not weights[i, t]:
                continue
            ce = -_log_softmax(student[i, t])[targets[i, t]]
            p = np.exp(_log_softmax(teacher[i, t] / temperature))
            kl = np.sum(p * (np.log(p) - _log_softmax(student[i, t] / temperature)))
            expected += (1 - w) * ce + w * temperature**2 * kl
            kl_total += kl
    assert weight == weights.sum() == 7
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill_kl"][0], kl_total, rtol=1e-5)


def test_zero_weight_is_the_seq2seq_loss_exactly():
    batch, logits = _loss_batch(1)
    distill = _task(distill_weight=0.0, distill_temperature=3.0)
    seq2seq = _task("seq2seq")
    plain = {k: v for k, v in batch.items() if k != "teacher_logits"}
    expected, expected_weight, _ = seq2seq.loss_and_metrics(logits, plain)
    for train in (True, False):  # with the teacher (training) and without (evaluation)
        prepared = distill.prepare_batch(batch if train else plain, jax.random.PRNGKey(0), train)
        loss_sum, weight, metrics = distill.loss_and_metrics(logits, prepared)
        np.testing.assert_array_equal(loss_sum, expected)
        assert weight == expected_weight
        assert ("distill_kl" in metrics) == train


def test_teacher_logits_of_another_shape_are_refused_by_name():
    # A batch's teacher_logits one position longer failed deep in a broadcast.
    logits = jnp.zeros((2, 5, 7))
    targets, weights = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5))
    for teacher in (jnp.zeros((2, 6, 7)), jnp.zeros((2, 5, 1))):
        with pytest.raises(ValueError, match=r"teacher_logits must have the student's logits' "):
            distillation_token_loss(
                logits, targets, weights, teacher, temperature=1.0, distill_weight=0.5
            )


def test_bad_configs_fail_at_once(tmp_path):
    with pytest.raises(ValueError, match=r"distill_weight must be in \[0, 1\], got 1.5"):
        _task(distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_temperature must be a number > 0, got 0"):
        _task(distill_temperature=0.0)
    with pytest.raises(ValueError, match=r"sep_id must be in \[0, 12\).*got 12"):
        _task(sep_id=VOCAB)
    with pytest.raises(ValueError, match="matformer_widths must be \\(\\)"):
        _task(matformer_widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="teacher_workdir=.* is not a training workdir"):
        _task(teacher_workdir=str(tmp_path))
    batch, _ = _loss_batch()
    del batch["teacher_logits"]
    for name in ("seq2seq_distillation", "causal_lm_distillation"):
        with pytest.raises(ValueError, match="needs a teacher in training"):
            _task(name).prepare_batch(batch, jax.random.PRNGKey(0), train=True)


def _save_run(config, workdir):
    """A workdir as ``effformer train`` leaves it (config and a checkpoint), with random
    parameters drawn on the host (no compiled init)."""
    from effformer.train.checkpoint import Checkpointer, save_config
    from effformer.train.experiment import build_experiment

    exp = build_experiment(config)
    rng = np.random.default_rng(0)

    def leaf(shape):
        if jnp.issubdtype(shape.dtype, jnp.floating):
            return jnp.asarray(rng.normal(0.0, 0.3, shape.shape), shape.dtype)
        return jnp.zeros(shape.shape, shape.dtype)

    state = jax.tree.map(leaf, exp.abstract_state)
    save_config(config, workdir)
    checkpointer = Checkpointer(workdir)
    checkpointer.save(0, state, {})
    checkpointer.close()
    return exp.info


def test_teacher_from_a_workdir_labels_the_student_batch(make_config, tmp_path):
    """The teacher restored from a run's workdir gives the jitted step its aligned logits."""
    from effformer.data import default_data_config
    from effformer.train import restore

    config = make_config()
    config.data = default_data_config("reverse")
    config.model.name, config.model.tiny, config.task.name = "lm_decoder", True, "causal_lm"
    teacher_dir = tmp_path / "teacher"
    info = _save_run(config, teacher_dir)
    task = _task(info=info, teacher_workdir=str(teacher_dir), distill_weight=0.5)
    control = _task("causal_lm_distillation", info=info, teacher_workdir=str(teacher_dir))
    run = restore(teacher_dir)
    inputs, targets = _rows()
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}

    @jax.jit
    def labels(batch):  # as in the trainer's step: the task prepares the batch under jit
        tokens, lengths = teacher_sequence(batch["inputs"], batch["targets"], sep_id=SEP)
        logits = run.model.apply(run.variables, tokens)
        key = jax.random.PRNGKey(0)
        return (
            task.prepare_batch(batch, key, train=True)["teacher_logits"],
            aligned_teacher_logits(logits, lengths, targets.shape[1]),
            control.prepare_batch({"inputs": tokens}, key, train=True)["teacher_logits"],
            logits,
        )

    got, expected, control_got, control_expected = labels(batch)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(control_got, control_expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.std(expected)) > 0.1  # a teacher whose logits depend on its input
    with pytest.raises(
        ValueError, match=f"vocabulary has {info.vocab_size} tokens, the student's 40"
    ):
        _task(info=info, teacher_workdir=str(teacher_dir), vocab_size=40)


def test_teacher_must_be_a_decoder(monkeypatch, tmp_path):
    """An encoder-decoder (or encoder) run is refused as a teacher (a stand-in restored run)."""
    evaluate_module = importlib.import_module("effformer.train.evaluate")
    (tmp_path / "config.json").write_text("{}")
    for model in ("lm_encoder_decoder", "lm_encoder"):
        run = types.SimpleNamespace(model=models.create(model, tiny=True), variables={})
        monkeypatch.setattr(evaluate_module, "restore", lambda *a, run=run, **k: run)
        with pytest.raises(ValueError, match="must be a decoder-only TransformerLM"):
            _task(info=types.SimpleNamespace(vocab_size=64), teacher_workdir=str(tmp_path))
