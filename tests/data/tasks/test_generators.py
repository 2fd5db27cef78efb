"""The generated sequence tasks: determinism, sizes, correct answers, record layout, bad input."""

import itertools

import numpy as np
import pytest

from effformer.data import create_input_pipeline, default_data_config, get_dataset_info
from effformer.data.registry import get_dataset_spec
from effformer.data.tasks import DATASETS, TaskDataset, make_task
from effformer.data.tasks.base import SPLITS

ALL_DATASETS = sorted(DATASETS) + [f"{name}_seq2seq" for name in sorted(DATASETS)]


def dataset(name):
    return get_dataset_spec(name).generated


def _value(digit_symbols):
    return int("".join(digit_symbols))


def _mod_eval(tokens, p):
    """Independent reference: Python evaluates the expression over the rationals, then mod p."""
    from fractions import Fraction

    expression = " ".join(f"Fraction({t})" if t.isdigit() else t for t in tokens)
    value = eval(expression, {"Fraction": Fraction})  # noqa: S307 - our own generated tokens.
    return value.numerator * pow(value.denominator, p - 2, p) % p


def _lis(values):
    best = 0
    for size in range(len(values), 0, -1):
        for subset in itertools.combinations(values, size):
            if all(a < b for a, b in itertools.pairwise(subset)):
                return size
    return best


def _check_answer(name, prompt, answer):
    """Recomputes the answer from the prompt by an independent route."""
    task = DATASETS[name][0]
    if task == "copy":
        assert answer == prompt
    elif task == "reverse":
        assert answer == prompt[::-1]
    elif task == "addition":
        plus = prompt.index("+")
        total = _value(prompt[:plus]) + _value(prompt[plus + 1 :])
        assert _value(answer[::-1]) == total and len(answer) == plus + 1
    elif task == "summation":
        assert answer == [str(sum(map(int, prompt)) % 10)]
    elif task == "parity":
        assert answer == [str(prompt.count("1") % 2)]
    elif task == "sorting":
        if name == "sorting":
            assert answer == sorted(prompt)
        else:
            numbers = "".join(prompt).split(",")
            assert "".join(answer).split(",") == sorted(numbers)
    elif task == "polynomial_evaluation":
        coefficients, x = prompt[:-2], int(prompt[-1])
        degree = len(coefficients) - 1
        value = sum(int(c) * x ** (degree - k) for k, c in enumerate(coefficients)) % 10
        assert answer == [str(value)]
    elif task == "inverse_permutation":
        bar = prompt.index("|")
        permutation = [int(p[1:]) for p in prompt[:bar]]
        permuted = prompt[bar + 1 : bar + 1 + len(permutation)]
        assert [permuted[permutation.index(j)] for j in range(len(permutation))] == answer
        assert sorted(permutation) == list(range(len(permutation)))
    elif task == "arithmetic_mod":
        value = _mod_eval(prompt[:-1], 11)
        assert answer[-1] == str(value)
        if "cot" in name:  # Every step has the same value and one operation fewer.
            steps = " ".join(answer).split(" = ")
            for step in steps:
                assert _mod_eval(step.split(), 11) == value
            ops = [sum(t in "+-*/" for t in s.split()) for s in steps]
            assert ops == list(
                range(
                    prompt.count("+")
                    + prompt.count("-")
                    + prompt.count("*")
                    + prompt.count("/")
                    - 1,
                    -1,
                    -1,
                )
            )
    elif task == "lis":
        values = [int(v) for v in prompt]
        assert answer[-1] == str(_lis(values))
        if "cot" in name:
            dp = [int(d) for d in answer[:-2]]
            assert dp == [
                _lis([v for v in values[:i] if v < values[i]]) + 1 for i in range(len(values))
            ]
    elif task in ("lego", "scan", "linear_equations_mod", "edit_distance"):
        pass  # Checked against independent references in their own test files.
    else:
        raise AssertionError(f"no reference for {task}")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_answers_are_correct_and_sizes_in_range(name):
    data = dataset(name)
    for split in SPLITS:
        low, high = data.split_lengths[split]
        for index in range(12):
            length, prompt, answer = data.instance(split, index)
            assert low <= length <= high
            _check_answer(name, prompt, answer)


def test_hand_checked_instances():
    # Computed by hand from the printed prompts.
    length, prompt, answer = dataset("addition").instance("test_long", 7)
    assert " ".join(prompt) == "9 7 2 8 4 5 0 5 + 7 2 8 4 7 1 8 5"
    assert " ".join(answer) == "0 9 6 1 3 1 0 7 1"  # 170131690, least significant first.
    _, prompt, answer = dataset("arithmetic_mod11_cot").instance("test_long", 7)
    assert " ".join(prompt) == "( ( 8 * ( 4 + 6 ) ) - 7 ) - 9 ="
    assert " ".join(answer) == "( ( 8 * 10 ) - 7 ) - 9 = ( 3 - 7 ) - 9 = 7 - 9 = 9"
    task = make_task("inverse_permutation", num_scratch=2)
    prompt, answer = task.instance(np.random.default_rng(0), 3)
    bar = prompt.index("|")
    # pi, y = x[pi] -> x, by hand for the drawn permutation.
    x = {int(p[1:]): y for p, y in zip(prompt[:bar], prompt[bar + 1 : bar + 4], strict=True)}
    assert answer == [x[0], x[1], x[2]] and prompt[-2:] == ["_", "_"]


@pytest.mark.parametrize("name", ["copy", "lis_cot_seq2seq", "inverse_permutation"])
def test_deterministic_from_the_seed(name):
    data = dataset(name)
    again = TaskDataset(data.task, name=name, format=data.format, seed=0)
    other = TaskDataset(data.task, name=name, format=data.format, seed=1)
    for split in SPLITS:
        first = [data.example(split, i) for i in range(8)]
        second = [again.example(split, i) for i in range(8)]
        third = [other.example(split, i) for i in range(8)]
        for a, b in zip(first, second, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
        assert any(
            not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, third, strict=True)
        )


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_extrapolation_splits_are_disjoint(name):
    task = dataset(name).task
    if task.extrapolation:
        assert task.test_lengths[0] > task.train_lengths[1]
    else:  # These tasks test at the training sizes.
        assert task.test_lengths == task.train_lengths


def test_causal_lm_record_layout():
    data = dataset("reverse")
    length, prompt, answer = data.instance("test", 3)
    record = data.example("test", 3)
    vocab = data.vocabulary
    n = len(prompt) + 1 + len(answer) + 1
    assert vocab.decode(record["inputs"][:n]) == prompt + ["<sep>"] + answer + ["<eos>"]
    assert np.all(record["inputs"][n:] == 0)
    np.testing.assert_array_equal(record["targets"][: n - 1], record["inputs"][1:n])
    scored = np.flatnonzero(record["weights"])
    assert vocab.decode(record["targets"][scored]) == answer + ["<eos>"]
    assert record["length"] == length and record["prompt_length"] == len(prompt) + 1


def test_seq2seq_record_layout():
    data = dataset("reverse_seq2seq")
    _, prompt, answer = data.instance("train", 5)
    record = data.example("train", 5)
    vocab = data.vocabulary
    assert vocab.decode(record["inputs"][: len(prompt)]) == prompt
    assert np.all(record["inputs"][len(prompt) :] == 0)
    scored = record["weights"] > 0
    assert vocab.decode(record["targets"][scored]) == answer + ["<eos>"]
    assert np.all(record["targets"][~scored] == 0)


@pytest.mark.parametrize("name", ["sorting_multidigit", "addition_seq2seq"])
def test_pipeline_batches_have_static_shapes_and_eval_padding(name):
    config = default_data_config(name)
    info = get_dataset_info(config)
    assert info.vocab_size == len(dataset(name).vocabulary)
    pipeline = create_input_pipeline(
        config, split="test_long", global_batch_size=500, train=False, seed=0,
        process_index=0, process_count=1,
    )  # fmt: skip
    batches = list(pipeline)
    assert len(batches) == 2  # 512 examples padded to 1000.
    last = batches[-1]
    assert last["inputs"].shape == (500, *info.input_shape)
    assert last["mask"].sum() == 12 and not np.any(last["weights"][~last["mask"]])
    train = next(iter(create_input_pipeline(
        config, split="train", global_batch_size=4, train=True, seed=0,
        process_index=0, process_count=1,
    )))  # fmt: skip
    assert train["inputs"].dtype == np.int32 and train["mask"].all()


def test_bad_input():
    with pytest.raises(ValueError, match="unknown task 'copyy'"):
        make_task("copyy")
    with pytest.raises(ValueError, match=r"test_lengths \(5, 9\) overlap train_lengths \(1, 8\)"):
        make_task("copy", train_lengths=(1, 8), test_lengths=(5, 9))
    with pytest.raises(ValueError, match="max_value 100 cannot be written with num_digits=2"):
        make_task("sorting", num_digits=2, max_value=100)
    with pytest.raises(ValueError, match="modulus must be prime"):
        make_task("arithmetic_mod", modulus=10)
    with pytest.raises(ValueError, match="train_lengths: expected a \\(low, high\\) pair"):
        make_task("parity", train_lengths=(0, 4))
    with pytest.raises(ValueError, match="format must be one of"):
        TaskDataset(make_task("copy"), name="x", format="mlm")
    with pytest.raises(ValueError, match="split must be one of"):
        dataset("copy").as_data_source("validation")
    with pytest.raises(ValueError, match="symbol 's99' is not in the vocabulary"):
        dataset("copy").vocabulary.encode(["s99"])
    with pytest.raises(ValueError, match="unknown dataset 'no_such_task'"):
        get_dataset_spec("no_such_task")
