"""Arithmetic tasks of the length-generalisation suite: addition, summation, parity,
polynomial evaluation.

Sizes: addition, the number of digits of each operand; summation and parity,
the number of input digits; polynomial evaluation, the degree.
"""

from __future__ import annotations

from effformer.data.tasks.base import SequenceTask, check_int, digits, register_sequence_task


@register_sequence_task
class Addition(SequenceTask):
    """``a + b`` for two ``length``-digit numbers (base ``base``, zero-padded).

    Prompt ``a_1 .. a_n + b_1 .. b_n`` (most significant digit first); answer
    ``a + b`` with ``n + 1`` digits, least significant digit first when
    ``reverse_answer`` (so a causal model meets each carry after the digits that
    make it), else most significant first.
    """

    name = "addition"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 4),
        test_lengths: tuple[int, int] = (5, 8),
        *,
        base: int = 10,
        reverse_answer: bool = True,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.base = check_int("addition: base", base, 2)
        self.reverse_answer = reverse_answer
        self.symbols = tuple(str(d) for d in range(self.base)) + ("+",)

    def instance(self, rng, length):
        a_digits = rng.integers(0, self.base, length)
        b_digits = rng.integers(0, self.base, length)
        total = _value(a_digits, self.base) + _value(b_digits, self.base)
        answer = digits(total, self.base, length + 1)
        prompt = [str(d) for d in a_digits] + ["+"] + [str(d) for d in b_digits]
        return prompt, answer[::-1] if self.reverse_answer else answer

    def max_lengths(self, length):
        return 2 * length + 1, length + 1


def _value(digit_values, base: int) -> int:
    value = 0
    for digit in digit_values:
        value = value * base + int(digit)
    return value


@register_sequence_task
class Summation(SequenceTask):
    """The sum of ``length`` digits modulo ``base``: a one-token answer."""

    name = "summation"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 8),
        test_lengths: tuple[int, int] = (9, 16),
        *,
        base: int = 10,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.base = check_int("summation: base", base, 2)
        self.symbols = tuple(str(d) for d in range(self.base))

    def instance(self, rng, length):
        values = rng.integers(0, self.base, length)
        return [str(v) for v in values], [str(int(values.sum()) % self.base)]

    def max_lengths(self, length):
        return length, 1


@register_sequence_task
class Parity(SequenceTask):
    """Whether ``length`` random bits hold an odd number of ones: answer ``1`` or ``0``."""

    name = "parity"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 8),
        test_lengths: tuple[int, int] = (9, 16),
        *,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.symbols = ("0", "1")

    def instance(self, rng, length):
        bits = rng.integers(0, 2, length)
        return [str(b) for b in bits], [str(int(bits.sum()) % 2)]

    def max_lengths(self, length):
        return length, 1


@register_sequence_task
class PolynomialEvaluation(SequenceTask):
    """``P(x) mod modulus`` for a degree-``length`` polynomial.

    Prompt ``c_n .. c_1 c_0 | x`` (coefficients of x^n down to x^0, each in
    [0, modulus)); answer one token, ``sum_k c_k x^k mod modulus``.
    """

    name = "polynomial_evaluation"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 4),
        test_lengths: tuple[int, int] = (5, 8),
        *,
        modulus: int = 10,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.modulus = check_int("polynomial_evaluation: modulus", modulus, 2)
        self.symbols = tuple(str(v) for v in range(self.modulus)) + ("|",)

    def instance(self, rng, length):
        coefficients = [int(c) for c in rng.integers(0, self.modulus, length + 1)]
        x = int(rng.integers(0, self.modulus))
        value = 0
        for coefficient in coefficients:  # Horner, highest degree first.
            value = (value * x + coefficient) % self.modulus
        return [str(c) for c in coefficients] + ["|", str(x)], [str(value)]

    def max_lengths(self, length):
        return length + 3, 1
