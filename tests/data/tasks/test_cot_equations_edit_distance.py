"""Linear equations modulo 11 and edit distance, direct and step by step, against
independent references (brute-force solutions, a memoised recursion)."""

import functools
import itertools

import numpy as np
import pytest

from effformer.data.registry import get_dataset_spec
from effformer.data.tasks import TaskDataset, make_task
from effformer.data.tasks.base import SPLITS

P = 11


def _parse_system(tokens):
    """``a_11 .. a_1n = b_1 ; ...`` -> (A, b)."""
    matrix, rhs = [], []
    for equation in " ".join(tokens).split(" ; "):
        left, right = equation.split(" = ")
        matrix.append([int(v) for v in left.split()])
        rhs.append(int(right))
    return matrix, rhs


def _solutions(matrix, rhs):
    """Reference: every x in Z_11^n with A x = b, by enumeration."""
    n = len(matrix)
    return [
        list(x)
        for x in itertools.product(range(P), repeat=n)
        if all(sum(a * v for a, v in zip(row, x, strict=True)) % P == b
               for row, b in zip(matrix, rhs, strict=True))
    ]  # fmt: skip


def test_linear_equations_answers_and_steps():
    direct = get_dataset_spec("linear_equations_mod11_direct").generated
    cot = get_dataset_spec("linear_equations_mod11_cot").generated
    seen = set()
    for split in SPLITS:
        for index in range(12):
            length, prompt, answer = direct.instance(split, index)
            assert 1 <= length <= 3
            seen.add(length)
            matrix, rhs = _parse_system(prompt)
            assert len(matrix) == length and all(len(row) == length for row in matrix)
            assert _solutions(matrix, rhs) == [[int(v) for v in answer]]  # unique, and it
            _, cot_prompt, chain = cot.instance(split, index)
            assert cot_prompt == prompt  # same draws: the formats differ only in the answer
            *steps, solution = " ".join(chain).split(" | ")
            assert solution.split() == answer and len(steps) == length
            for k, step in enumerate(steps):
                step_matrix, step_rhs = _parse_system(step.split())
                # Elimination keeps the solution set and clears column k except its pivot.
                assert _solutions(step_matrix, step_rhs) == [[int(v) for v in answer]]
                for column in range(k + 1):
                    assert [row[column] for row in step_matrix] == list(np.eye(length)[column])
            cot.vocabulary.encode(prompt + chain)
    assert seen == {1, 2, 3}


def test_linear_equations_2x2_by_hand():
    # 2x + 3y = 1, x + y = 2 (mod 11): x = 5, y = 8 (10 + 24 = 34 = 1, 5 + 8 = 13 = 2).
    matrix, rhs = [[2, 3], [1, 1]], [1, 2]
    assert make_task("linear_equations_mod").solve(matrix, rhs) == ["5", "8"]
    chain = make_task("linear_equations_mod", step_by_step=True).solve(matrix, rhs)
    # Step 1: row 1 / 2 (inverse of 2 is 6): 1 7 = 6; row 2 - row 1: 0 5 = 7.
    # Step 2: row 2 / 5 (inverse 9): 0 1 = 8; row 1 - 7 row 2: 1 0 = 6 - 56 = 5.
    assert " ".join(chain) == "1 7 = 6 ; 0 5 = 7 | 1 0 = 5 ; 0 1 = 8 | 5 8"
    # A zero pivot is swapped with a later equation: y = 3, x = 4.
    assert make_task("linear_equations_mod").solve([[0, 1], [1, 0]], [3, 4]) == ["4", "3"]


def _edit_distance(a, b):
    """Reference: the recursion on suffixes, memoised."""

    @functools.cache
    def distance(i, j):
        if i == len(a) or j == len(b):
            return len(a) - i + len(b) - j
        if a[i] == b[j]:
            return distance(i + 1, j + 1)
        return 1 + min(distance(i + 1, j), distance(i, j + 1), distance(i + 1, j + 1))

    return distance(0, 0)


def test_edit_distance_answers_and_table():
    direct = get_dataset_spec("edit_distance_direct").generated
    cot = get_dataset_spec("edit_distance_cot_seq2seq").generated
    seen = set()
    for split in SPLITS:
        for index in range(12):
            length, prompt, answer = direct.instance(split, index)
            seen.add(length)
            bar = prompt.index("|")
            a, b = prompt[:bar], prompt[bar + 1 :]
            assert len(a) == length and max(1, length - 2) <= len(b) <= length
            assert answer == [str(_edit_distance(a, b))]
            _, cot_prompt, chain = cot.instance(split, index)
            assert cot_prompt == prompt and chain[-2:] == ["=", answer[0]]
            rows = [[int(v) for v in row.split()] for row in " ".join(chain[:-2]).split(" | ")]
            expected = [[_edit_distance(a[:i], b[:j]) for j in range(len(b) + 1)]
                        for i in range(len(a) + 1)]  # fmt: skip
            assert rows == expected
            cot.vocabulary.encode(prompt + chain)
    assert seen == set(range(1, 7))


def test_edit_distance_kitten_sitting():
    task = make_task("edit_distance", alphabet_size=26, step_by_step=True)
    chain = task.solve(list("kitten"), list("sitting"))
    rows = " ".join(chain).split(" = ")[0].split(" | ")
    # The textbook table (rows: "", k, i, t, t, e, n; columns: "", s, i, t, t, i, n, g).
    assert rows == [
        "0 1 2 3 4 5 6 7",
        "1 1 2 3 4 5 6 7",
        "2 2 1 2 3 4 5 6",
        "3 3 2 1 2 3 4 5",
        "4 4 3 2 1 2 3 4",
        "5 5 4 3 2 2 3 4",
        "6 6 5 4 3 3 2 3",
    ]
    assert chain[-2:] == ["=", "3"]
    assert make_task("edit_distance", alphabet_size=26).solve(list("kitten"), list("sitting")) == [
        "3"
    ]


def test_deterministic_from_the_seed():
    for name in ("linear_equations_mod11_cot", "edit_distance_direct"):
        data = get_dataset_spec(name).generated
        again = TaskDataset(data.task, name=name, seed=0)
        other = TaskDataset(data.task, name=name, seed=5)
        for split in SPLITS:
            for index in range(4):
                a, b = data.example(split, index), again.example(split, index)
                assert all(np.array_equal(a[k], b[k]) for k in a)
        assert any(
            not np.array_equal(
                data.example("train", i)["inputs"], other.example("train", i)["inputs"]
            )
            for i in range(4)
        )


def test_bad_input():
    with pytest.raises(ValueError, match="linear_equations_mod: modulus must be prime.*got 10"):
        make_task("linear_equations_mod", modulus=10)
    with pytest.raises(ValueError, match="edit_distance: alphabet_size must be at most 26.*got 30"):
        make_task("edit_distance", alphabet_size=30)
    with pytest.raises(ValueError, match="step_by_step must be a bool"):
        make_task("edit_distance", step_by_step="yes")
    with pytest.raises(ValueError, match=r"test_lengths \(2, 5\) overlap train_lengths \(1, 3\)"):
        make_task("linear_equations_mod", test_lengths=(2, 5), extrapolation=True)
    with pytest.raises(ValueError, match="singular"):
        make_task("linear_equations_mod").solve([[1, 2], [2, 4]], [0, 0])
    with pytest.raises(ValueError, match="unknown task 'edit_distances'"):
        make_task("edit_distances")
