"""``effformer generate`` (effformer/train/sample.py): prompts, answers and continuations.

The prompts and answers are the dataset's instances; a greedy continuation is
self-consistent (the model, teacher-forced on prompt + continuation, predicts
every continuation token at the position before it), which fails if the
prompt were cut at the wrong place; ``exact`` is the comparison with the
answer; bad runs and arguments are refused.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.data import default_data_config
from effformer.data.registry import get_dataset_spec
from effformer.train.experiment import build_experiment
from effformer.train.sample import Sample, sample_continuations


@pytest.fixture(scope="module")
def runs(session_make_config):
    """dataset name -> (experiment, variables) of an untrained tiny model."""
    built = {}

    def get(dataset: str, model_name: str | None = None):
        seq2seq = dataset.endswith("_seq2seq")
        model_name = model_name or ("lm_encoder_decoder" if seq2seq else "lm_decoder")
        if (dataset, model_name) not in built:
            config = session_make_config(mesh__num_devices=1)
            config.data = default_data_config(dataset)
            config.model.name = model_name
            config.model.tiny = True
            config.task.name = "seq2seq" if seq2seq else "causal_lm"
            exp = build_experiment(config)
            params = jax.jit(exp.model.init)(jax.random.PRNGKey(1), **exp.model.dummy_inputs(1))
            built[dataset, model_name] = exp, params
        return built[dataset, model_name]

    return get


def _ids(data, symbols):
    return data.vocabulary.encode(symbols)


def test_decoder_prompts_answers_and_greedy_self_consistency(runs):
    exp, variables = runs("reverse")
    data = get_dataset_spec("reverse").generated
    samples = sample_continuations(exp, variables, split="test", num_examples=4)
    assert [s.index for s in samples] == [0, 1, 2, 3]
    # Greedy: teacher-forced on its own output (one causal pass over the rows, zero-padded
    # after them), the model predicts each generated token at the position before it.
    width = max(len(sample.prompt) + len(sample.generated) for sample in samples)
    rows = np.zeros((len(samples), width), np.int32)
    for sample in samples:
        size, prompt, answer = data.instance("test", sample.index)
        assert sample.size == size
        assert sample.prompt == [*prompt, "<sep>"]
        assert sample.answer == [*answer, "<eos>"]
        assert sample.exact == (sample.generated == sample.answer)
        assert "<eos>" not in sample.generated[:-1]
        row = _ids(data, sample.prompt + sample.generated)
        rows[sample.index, : len(row)] = row
    predicted = np.asarray(jnp.argmax(jax.jit(exp.model.apply)(variables, rows), -1))
    for sample in samples:
        start, stop = len(sample.prompt), len(sample.prompt) + len(sample.generated)
        np.testing.assert_array_equal(predicted[sample.index, start - 1 : stop - 1],
                                      rows[sample.index, start:stop])  # fmt: skip


def test_prefix_lm_generates_as_it_trained_and_as_sequence_eval_scores(runs):
    # A prefix LM trains with its prompt (prompt and <sep>) as the bidirectional prefix
    # (CausalLMTask.prompt_is_prefix), and teacher forcing (sequence_eval) runs it so.
    # Greedy continuations must be the ones that forward pass predicts.
    exp, variables = runs("reverse", "lm_prefix")
    assert exp.task.prompt_is_prefix
    # Sharper than the initialisation's near-uniform logits, so the prefix's attention
    # changes the argmax (it does at this scale, with this seed).
    variables = jax.tree.map(lambda x: 4.0 * x, variables)
    data = get_dataset_spec("reverse").generated
    samples = sample_continuations(exp, variables, split="test", num_examples=4)
    width = max(len(sample.prompt) + len(sample.generated) for sample in samples)
    rows = np.zeros((len(samples), width), np.int32)
    for sample in samples:
        row = _ids(data, sample.prompt + sample.generated)
        rows[sample.index, : len(row)] = row
    prompt_length = np.array([len(sample.prompt) for sample in samples], np.int32)
    inputs = exp.task.model_inputs({"inputs": rows, "prompt_length": prompt_length})
    np.testing.assert_array_equal(inputs["prefix_lengths"], prompt_length)
    predicted = np.asarray(jnp.argmax(jax.jit(exp.model.apply)(variables, **inputs), -1))
    for sample in samples:
        start, stop = len(sample.prompt), len(sample.prompt) + len(sample.generated)
        np.testing.assert_array_equal(predicted[sample.index, start - 1 : stop - 1],
                                      rows[sample.index, start:stop])  # fmt: skip
    # The same rows run causal (as a decoder) predict otherwise: the prefix matters here.
    causal = np.asarray(jnp.argmax(jax.jit(exp.model.apply)(variables, inputs=rows), -1))
    assert not np.array_equal(causal, predicted)


def test_a_run_of_a_task_built_on_causal_lm_is_continued(runs):
    # A distillation student (causal_lm_distillation) gives its model causal_lm's inputs.
    from effformer.train.tasks import CausalLMTask

    class StudentTask(CausalLMTask):
        name = "test_student_lm"

    exp, variables = runs("reverse")
    config = ml_collections.ConfigDict(exp.config.to_dict())
    config.task.name = StudentTask.name
    student = dataclasses.replace(exp, config=config, task=StudentTask(config.task, exp.info))
    expected = sample_continuations(exp, variables, split="test", num_examples=2)
    assert sample_continuations(student, variables, split="test", num_examples=2) == expected


def test_encoder_decoder_prompts_and_greedy_self_consistency(runs):
    exp, variables = runs("reverse_seq2seq")
    data = get_dataset_spec("reverse_seq2seq").generated
    samples = sample_continuations(exp, variables, split="test", num_examples=3, max_new_tokens=5)
    sources = np.zeros((len(samples), data.row_lengths["inputs"]), np.int32)
    decoder_inputs = np.zeros((len(samples), 6), np.int32)  # the start token 0, then 5
    for sample in samples:
        _, prompt, answer = data.instance("test", sample.index)
        assert sample.prompt == prompt and sample.answer == [*answer, "<eos>"]
        assert 1 <= len(sample.generated) <= 5
        sources[sample.index, : len(prompt)] = _ids(data, prompt)
        decoder_inputs[sample.index, 1 : 1 + len(sample.generated)] = _ids(data, sample.generated)
    logits = jax.jit(exp.model.apply)(variables, sources, decoder_inputs)
    predicted = np.asarray(jnp.argmax(logits, -1))
    for sample in samples:
        n = len(sample.generated)
        np.testing.assert_array_equal(predicted[sample.index, :n], _ids(data, sample.generated))


def test_exact_is_the_answer_with_its_eos():
    right = Sample(0, 2, ["a", "b", "<sep>"], ["b", "a", "<eos>"], ["b", "a", "<eos>"])
    assert right.exact
    assert not dataclasses.replace(right, generated=["b", "a"]).exact  # no <eos> yet
    assert not dataclasses.replace(right, generated=["b", "b", "<eos>"]).exact


def test_bad_runs_and_arguments_are_refused(runs):
    exp, variables = runs("reverse")
    with pytest.raises(ValueError, match=r"num_examples must be an int in \[1, 512\]"):
        sample_continuations(exp, variables, num_examples=0)
    # The message names the value received, not a stand-in for it.
    with pytest.raises(ValueError, match=r"\[1, 512\] \(the size of split 'test'\), got 2.5"):
        sample_continuations(exp, variables, num_examples=2.5)
    with pytest.raises(ValueError, match="split must be one of"):
        sample_continuations(exp, variables, split="validation")
    image_run = types.SimpleNamespace(
        config=ml_collections.ConfigDict(dict(task=dict(name="image_classification"))),
        model=exp.model,
    )
    with pytest.raises(ValueError, match="task must be one of .*got config.task.name="):
        sample_continuations(image_run, variables)
    encoder = dataclasses.replace(exp, model=exp.model.clone(kind="encoder"))
    with pytest.raises(ValueError, match="needs a decoder or prefix-LM TransformerLM"):
        sample_continuations(encoder, variables)
