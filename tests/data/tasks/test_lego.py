"""LEGO: answers resolved independently from the printed clauses, sizes, determinism, bad input."""

import numpy as np
import pytest

from effformer.data.registry import get_dataset_spec
from effformer.data.tasks import TaskDataset, make_task
from effformer.data.tasks.base import SPLITS


def _resolve(prompt):
    """Reference: parse ``v = s operand ; ...`` and substitute until every value is known."""
    clauses = " ".join(prompt).split(" ; ")
    parsed = []
    for clause in clauses:
        variable, equals, sign, operand = clause.split()
        assert equals == "=" and sign in "+-"
        parsed.append((variable, -1 if sign == "-" else 1, operand))
    values = {}
    while len(values) < len(parsed):  # Each pass resolves at least the next link of the chain.
        progress = False
        for variable, sign, operand in parsed:
            if variable not in values and (operand == "1" or operand in values):
                values[variable] = sign * (1 if operand == "1" else values[operand])
                progress = True
        assert progress, "the clauses do not form a chain from the root"
    return [variable for variable, _, _ in parsed], values


def test_answers_sizes_and_chain_structure():
    data = get_dataset_spec("lego").generated
    assert data.task.train_lengths == (1, 6) and data.task.test_lengths == (7, 12)
    seen = set()
    for split in SPLITS:
        low, high = data.split_lengths[split]
        for index in range(40):
            length, prompt, answer = data.instance(split, index)
            assert low <= length <= high
            seen.add(length)
            variables, values = _resolve(prompt)
            assert len(variables) == len(set(variables)) == length  # n clauses, n variables
            assert sum(p == "1" for p in prompt) == 1  # exactly one root
            assert answer == [f"{values[v]:+d}" for v in variables]
            data.vocabulary.encode(prompt + answer)  # representable
    assert seen == set(range(1, 13))


def test_hand_checked_instance():
    length, prompt, answer = get_dataset_spec("lego").generated.instance("train", 3)
    assert length == 5
    assert " ".join(prompt) == "q = + k ; k = - v ; z = + i ; i = + q ; v = + 1"
    # v = +1, k = -v = -1, q = +k = -1, i = +q = -1, z = +i = -1; in the prompt's order:
    assert answer == ["-1", "-1", "-1", "-1", "+1"]


def test_clauses_are_shuffled():
    task = make_task("lego")
    rng = np.random.default_rng(0)
    roots_first = 0
    for _ in range(50):
        prompt, _ = task.instance(rng, 6)
        roots_first += prompt[3] == "1"
    assert roots_first < 25  # in chain order the root would always come first


def test_deterministic_from_the_seed():
    data = get_dataset_spec("lego_seq2seq").generated
    again = TaskDataset(data.task, name="lego", format="seq2seq", seed=0)
    other = TaskDataset(data.task, name="lego", format="seq2seq", seed=1)
    for split in SPLITS:
        for index in range(4):
            a, b = data.example(split, index), again.example(split, index)
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(
        not np.array_equal(data.example("train", i)["inputs"], other.example("train", i)["inputs"])
        for i in range(4)
    )


def test_bad_input():
    with pytest.raises(ValueError, match=r"lego: test_lengths \(5, 9\) overlap train_lengths"):
        make_task("lego", train_lengths=(1, 6), test_lengths=(5, 9))
    with pytest.raises(ValueError, match="needs 12 distinct variables, but num_variables is 8"):
        make_task("lego", num_variables=8)
    with pytest.raises(ValueError, match="num_variables must be at most 26.*got 27"):
        make_task("lego", num_variables=27)
    with pytest.raises(ValueError, match="unknown task 'legos'"):
        make_task("legos")
