"""String tasks of the length-generalisation suite: copy, reverse, sorting.

The size of an instance is the number of input items. Symbols are a
``alphabet_size``-letter alphabet (copy, reverse), digits (sorting), or
numbers of up to ``num_digits`` digits written digit by digit and separated by
``,`` (multi-digit sorting).
"""

from __future__ import annotations

import numpy as np

from effformer.data.tasks.base import SequenceTask, check_int, digits, register_sequence_task


class _AlphabetTask(SequenceTask):
    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 8),
        test_lengths: tuple[int, int] = (9, 16),
        *,
        alphabet_size: int = 10,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.alphabet_size = check_int(f"{self.name}: alphabet_size", alphabet_size, 2)
        self.symbols = tuple(f"s{i}" for i in range(self.alphabet_size))

    def _string(self, rng: np.random.Generator, length: int) -> list[str]:
        return [self.symbols[i] for i in rng.integers(0, self.alphabet_size, length)]

    def max_lengths(self, length: int) -> tuple[int, int]:
        return length, length


@register_sequence_task
class Copy(_AlphabetTask):
    """Copy: the answer is the input string."""

    name = "copy"

    def instance(self, rng, length):
        string = self._string(rng, length)
        return string, list(string)


@register_sequence_task
class Reverse(_AlphabetTask):
    """Reverse: the answer is the input string backwards."""

    name = "reverse"

    def instance(self, rng, length):
        string = self._string(rng, length)
        return string, string[::-1]


@register_sequence_task
class Sorting(SequenceTask):
    """Sort ``length`` numbers in [0, max_value] ascending.

    ``num_digits=1``: single-digit sorting, one token per number.
    ``num_digits>1``: multi-digit sorting, each number written in base ``base``
    with ``num_digits`` digits (zero-padded), numbers separated by ``,``.
    """

    name = "sorting"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 8),
        test_lengths: tuple[int, int] = (9, 16),
        *,
        base: int = 10,
        num_digits: int = 1,
        max_value: int | None = None,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.base = check_int("sorting: base", base, 2)
        self.num_digits = check_int("sorting: num_digits", num_digits, 1)
        capacity = self.base**self.num_digits
        self.max_value = (
            capacity - 1 if max_value is None else check_int("sorting: max_value", max_value, 1)
        )
        if self.max_value >= capacity:
            raise ValueError(
                f"sorting: max_value {self.max_value} cannot be written with num_digits="
                f"{self.num_digits} digits in base {self.base} (at most {capacity - 1})."
            )
        self.symbols = tuple(str(d) for d in range(self.base)) + (
            (",",) if self.num_digits > 1 else ()
        )

    def _write(self, numbers) -> list[str]:
        out: list[str] = []
        for i, number in enumerate(numbers):
            if i and self.num_digits > 1:
                out.append(",")
            out += digits(int(number), self.base, self.num_digits)
        return out

    def instance(self, rng, length):
        numbers = rng.integers(0, self.max_value + 1, length)
        return self._write(numbers), self._write(np.sort(numbers))

    def max_lengths(self, length):
        per_item = self.num_digits + (1 if self.num_digits > 1 else 0)
        size = length * per_item - (1 if self.num_digits > 1 else 0)
        return size, size
