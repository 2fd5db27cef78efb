"""Chain-of-thought tasks of Feng et al. (2023) beyond ``chain_of_thought.py``: linear
equations modulo a prime (Gaussian elimination) and edit distance (a dynamic
programme), each in a direct-answer and a step-by-step format.

* ``linear_equations_mod``: a system of n equations in n unknowns modulo
  ``modulus`` (a prime, 11 by default) with exactly one solution. Equation i is
  written by its coefficients in variable order, ``a_i1 .. a_in = b_i``, and
  equations are separated by ``;`` (positional, not the paper's ``a x_1 + ...``
  writing: it keeps a 3-unknown chain under 60 tokens). Direct: the answer is
  the solution ``x_1 .. x_n``. Step by step: Gauss-Jordan elimination, one
  unknown per step: step k swaps row k with the first equation (from the k-th
  on) whose coefficient of ``x_k`` is not 0, scales it so that coefficient is 1
  and subtracts it from every other equation so ``x_k`` leaves them; the system
  after each step is written, steps separated by ``|``, then ``|`` and the
  solution (after step n the system reads ``x_k = s_k``).
* ``edit_distance``: the Levenshtein distance (insertions, deletions,
  substitutions, each of cost 1) between a string of n letters and one of m
  letters, m drawn in [max(1, n - 2), n], both from the first ``alphabet_size``
  letters; prompt ``a_1 .. a_n | b_1 .. b_m``. Direct: the distance. Step by
  step: the rows 0..n of the DP table ``D[i][j]`` (distance between the first
  i letters of a and the first j of b, j = 0..m), rows separated by ``|``,
  then ``=`` and the distance (= ``D[n][m]``).

Sizes: the number of unknowns n (equations), the length n of the first
string (edit distance). By default the test sizes are the training sizes.
"""

from __future__ import annotations

import string

import numpy as np

from effformer.data.tasks.base import check_int, register_sequence_task
from effformer.data.tasks.chain_of_thought import _ChainOfThoughtTask, _is_prime


def gauss_jordan_steps(
    matrix: list[list[int]], rhs: list[int], modulus: int
) -> list[tuple[list[list[int]], list[int]]]:
    """The systems ``(A, b)`` after each elimination step (see the module docstring).

    ``matrix`` [n][n] must be invertible modulo the prime ``modulus``; the last
    system is the identity and the solution.
    """
    a = [list(row) for row in matrix]
    b = list(rhs)
    n = len(a)
    steps = []
    for k in range(n):
        pivot = next((r for r in range(k, n) if a[r][k] % modulus), None)
        if pivot is None:
            raise ValueError("gauss_jordan_steps: the matrix is singular modulo the modulus.")
        a[k], a[pivot] = a[pivot], a[k]
        b[k], b[pivot] = b[pivot], b[k]
        inverse = pow(a[k][k], modulus - 2, modulus)  # Fermat: the modulus is prime.
        a[k] = [v * inverse % modulus for v in a[k]]
        b[k] = b[k] * inverse % modulus
        for r in range(n):
            if r != k and a[r][k]:
                factor = a[r][k]
                a[r] = [(v - factor * w) % modulus for v, w in zip(a[r], a[k], strict=True)]
                b[r] = (b[r] - factor * b[k]) % modulus
        steps.append(([list(row) for row in a], list(b)))
    return steps


@register_sequence_task
class LinearEquationsMod(_ChainOfThoughtTask):
    """n linear equations in n unknowns modulo a prime (see the module docstring)."""

    name = "linear_equations_mod"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 3),
        test_lengths: tuple[int, int] = (1, 3),
        *,
        modulus: int = 11,
        step_by_step: bool = False,
        extrapolation: bool = False,
    ):
        super().__init__(
            train_lengths, test_lengths, step_by_step=step_by_step, extrapolation=extrapolation
        )
        self.modulus = check_int("linear_equations_mod: modulus", modulus, 2)
        if not _is_prime(self.modulus):
            raise ValueError(
                "linear_equations_mod: modulus must be prime (elimination divides by pivots), "
                f"got {modulus}."
            )
        self.symbols = tuple(str(v) for v in range(self.modulus)) + ("=", ";", "|")

    def _write(self, matrix: list[list[int]], rhs: list[int]) -> list[str]:
        out: list[str] = []
        for i, (row, value) in enumerate(zip(matrix, rhs, strict=True)):
            out += ([";"] if i else []) + [str(v) for v in row] + ["=", str(value)]
        return out

    def solve(self, matrix: list[list[int]], rhs: list[int]) -> list[str]:
        """The answer symbols for the system ``matrix x = rhs`` (invertible modulo the modulus)."""
        steps = gauss_jordan_steps(matrix, rhs, self.modulus)
        solution = [str(v) for v in steps[-1][1]]
        if not self.step_by_step:
            return solution
        answer: list[str] = []
        for step_matrix, step_rhs in steps:
            answer += self._write(step_matrix, step_rhs) + ["|"]
        return answer + solution

    def instance(self, rng, length):
        p = self.modulus
        while True:  # Rejection: a uniform invertible matrix (probability > 0.7 for p >= 5).
            matrix = [[int(v) for v in row] for row in rng.integers(0, p, (length, length))]
            if _rank_mod(matrix, p) == length:
                break
        solution = rng.integers(0, p, length)
        rhs = [int(np.dot(row, solution)) % p for row in matrix]
        return self._write(matrix, rhs), self.solve(matrix, rhs)

    def max_lengths(self, length):
        system = length * (length + 3) - 1
        return system, length * (system + 1) + length if self.step_by_step else length


def _rank_mod(matrix: list[list[int]], p: int) -> int:
    rows = [list(row) for row in matrix]
    rank = 0
    for column in range(len(rows[0]) if rows else 0):
        pivot = next((r for r in range(rank, len(rows)) if rows[r][column] % p), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        inverse = pow(rows[rank][column], p - 2, p)
        for r in range(len(rows)):
            if r != rank and rows[r][column] % p:
                factor = rows[r][column] * inverse
                rows[r] = [(v - factor * w) % p for v, w in zip(rows[r], rows[rank], strict=True)]
        rank += 1
    return rank


def edit_distance_table(a: list[str], b: list[str]) -> list[list[int]]:
    """The Levenshtein DP table ``D`` [len(a) + 1][len(b) + 1]; ``D[-1][-1]`` is the distance."""
    table = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i]
        for j in range(1, len(b) + 1):
            substitution = table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            row.append(min(table[i - 1][j] + 1, row[j - 1] + 1, substitution))
        table.append(row)
    return table


@register_sequence_task
class EditDistance(_ChainOfThoughtTask):
    """Levenshtein distance of two strings (see the module docstring)."""

    name = "edit_distance"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 6),
        test_lengths: tuple[int, int] = (1, 6),
        *,
        alphabet_size: int = 4,
        step_by_step: bool = False,
        extrapolation: bool = False,
    ):
        super().__init__(
            train_lengths, test_lengths, step_by_step=step_by_step, extrapolation=extrapolation
        )
        self.alphabet_size = check_int("edit_distance: alphabet_size", alphabet_size, 2)
        if self.alphabet_size > len(string.ascii_lowercase):
            raise ValueError(
                f"edit_distance: alphabet_size must be at most {len(string.ascii_lowercase)} "
                f"(letters a-z), got {alphabet_size}."
            )
        self.letters = tuple(string.ascii_lowercase[: self.alphabet_size])
        # DP entries are at most max(i, j) <= the longest first string.
        largest = max(self.train_lengths[1], self.test_lengths[1])
        self.symbols = self.letters + tuple(str(v) for v in range(largest + 1)) + ("|", "=")

    def solve(self, a: list[str], b: list[str]) -> list[str]:
        """The answer symbols for the strings ``a`` and ``b`` (lists of letters)."""
        table = edit_distance_table(a, b)
        distance = [str(table[-1][-1])]
        if not self.step_by_step:
            return distance
        answer: list[str] = []
        for i, row in enumerate(table):
            answer += (["|"] if i else []) + [str(v) for v in row]
        return answer + ["="] + distance

    def instance(self, rng, length):
        other_length = int(rng.integers(max(1, length - 2), length + 1))
        a = [self.letters[i] for i in rng.integers(0, self.alphabet_size, length)]
        b = [self.letters[i] for i in rng.integers(0, self.alphabet_size, other_length)]
        return a + ["|"] + b, self.solve(a, b)

    def max_lengths(self, length):
        table = (length + 1) * (length + 1) + length  # rows 0..n of up to n + 1 entries, and |
        return 2 * length + 1, table + 2 if self.step_by_step else 1
