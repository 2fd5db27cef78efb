"""Chain-of-thought tasks (Feng et al., 2023, "Towards Revealing the Mystery behind
Chain of Thought"), each in a direct-answer and a step-by-step format.

* ``arithmetic_mod``: an expression of ``length`` operators (+ - * /) over
  numbers modulo ``modulus`` (a prime, 11 by default; ``/`` multiplies by the
  inverse, divisors are never 0). Every operation but the outermost is in
  parentheses. Direct: the answer is the value. Step by step: ``= e_1 = e_2 ...
  = value``, where ``e_{k+1}`` is ``e_k`` with its leftmost innermost operation
  (both operands numbers) replaced by its value.
* ``lis``: the length of the longest strictly increasing subsequence of
  ``length`` numbers in [0, max_value]. Step by step: ``dp_1 .. dp_n = L`` with
  ``dp_i`` the length of the longest such subsequence ending at item i (the
  dynamic programme of the paper's CoT), ``L = max dp``.

By default the test sizes are the training sizes: the question is what a model
of a given size can compute, not extrapolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from effformer.data.tasks.base import SequenceTask, check_int, register_sequence_task

OPERATORS = ("+", "-", "*", "/")


def _is_prime(value: int) -> bool:
    return value >= 2 and all(value % d for d in range(2, int(value**0.5) + 1))


@dataclass
class _Node:
    """A number (``op`` None) or ``left op right``."""

    value: int
    op: str | None = None
    left: _Node | None = None
    right: _Node | None = None


class _ChainOfThoughtTask(SequenceTask):
    def __init__(self, train_lengths, test_lengths, *, step_by_step: bool, extrapolation: bool):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        if not isinstance(step_by_step, bool):
            raise ValueError(f"{self.name}: step_by_step must be a bool, got {step_by_step!r}.")
        self.step_by_step = step_by_step


@register_sequence_task
class ArithmeticMod(_ChainOfThoughtTask):
    """Arithmetic expressions modulo a prime (see the module docstring)."""

    name = "arithmetic_mod"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 4),
        test_lengths: tuple[int, int] = (1, 4),
        *,
        modulus: int = 11,
        step_by_step: bool = False,
        extrapolation: bool = False,
    ):
        super().__init__(
            train_lengths, test_lengths, step_by_step=step_by_step, extrapolation=extrapolation
        )
        self.modulus = check_int("arithmetic_mod: modulus", modulus, 2)
        if not _is_prime(self.modulus):
            raise ValueError(
                f"arithmetic_mod: modulus must be prime (division needs inverses), got {modulus}."
            )
        self.symbols = tuple(str(v) for v in range(self.modulus)) + OPERATORS + ("(", ")", "=")

    def _apply(self, op: str, a: int, b: int) -> int:
        p = self.modulus
        if op == "+":
            return (a + b) % p
        if op == "-":
            return (a - b) % p
        if op == "*":
            return (a * b) % p
        return (a * pow(b, p - 2, p)) % p  # Fermat inverse; b != 0 by construction.

    def _tree(self, rng: np.random.Generator, num_ops: int) -> _Node:
        if num_ops == 0:
            return _Node(int(rng.integers(0, self.modulus)))
        left_ops = int(rng.integers(0, num_ops))
        left = self._tree(rng, left_ops)
        right = self._tree(rng, num_ops - 1 - left_ops)
        op = OPERATORS[int(rng.integers(0, len(OPERATORS)))]
        if op == "/" and right.value == 0:
            op = "*"  # Never divide by zero; keeps every tree shape possible.
        return _Node(self._apply(op, left.value, right.value), op, left, right)

    def _write(self, node: _Node, outermost: bool = True) -> list[str]:
        if node.op is None:
            return [str(node.value)]
        inner = self._write(node.left, False) + [node.op] + self._write(node.right, False)
        return inner if outermost else ["(", *inner, ")"]

    def _reduce_once(self, node: _Node) -> bool:
        """Replaces the leftmost operation with two number operands by its value."""
        if node.op is None:
            return False
        if node.left.op is None and node.right.op is None:
            node.op, node.left, node.right = None, None, None
            return True
        return self._reduce_once(node.left) or self._reduce_once(node.right)

    def instance(self, rng, length):
        tree = self._tree(rng, length)
        prompt = self._write(tree) + ["="]
        if not self.step_by_step:
            return prompt, [str(tree.value)]
        answer: list[str] = []
        while self._reduce_once(tree):
            answer += self._write(tree) + (["="] if tree.op is not None else [])
        return prompt, answer

    def max_lengths(self, length):
        # n operators in this writing: (n + 1) numbers, n operators, 2 (n - 1) parentheses.
        def size(n: int) -> int:
            return 4 * n - 1 if n else 1

        steps = sum(size(n) + 1 for n in range(1, length)) + 1
        return size(length) + 1, steps if self.step_by_step else 1


@register_sequence_task
class LongestIncreasingSubsequence(_ChainOfThoughtTask):
    """Length of the longest strictly increasing subsequence (see the module docstring)."""

    name = "lis"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 8),
        test_lengths: tuple[int, int] = (1, 8),
        *,
        max_value: int = 9,
        step_by_step: bool = False,
        extrapolation: bool = False,
    ):
        super().__init__(
            train_lengths, test_lengths, step_by_step=step_by_step, extrapolation=extrapolation
        )
        self.max_value = check_int("lis: max_value", max_value, 1)
        largest = max(self.max_value, self.train_lengths[1], self.test_lengths[1])
        self.symbols = tuple(str(v) for v in range(largest + 1)) + ("=",)

    def instance(self, rng, length):
        values = [int(v) for v in rng.integers(0, self.max_value + 1, length)]
        dp = []
        for i, value in enumerate(values):
            dp.append(1 + max([dp[j] for j in range(i) if values[j] < value], default=0))
        prompt = [str(v) for v in values]
        if not self.step_by_step:
            return prompt, [str(max(dp))]
        return prompt, [str(d) for d in dp] + ["=", str(max(dp))]

    def max_lengths(self, length):
        return length, length + 2 if self.step_by_step else 1
