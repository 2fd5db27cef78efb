"""Inverse permutation, with optional scratch tokens.

An instance of size n: a permutation ``pi`` of 0..n-1 and the permuted string
``y`` with ``y[i] = x[pi[i]]``; the answer is the original string ``x``, i.e.
``x[j] = y[pi^-1[j]]``. The prompt is ``pi[0] .. pi[n-1] | y[0] .. y[n-1]``
followed by ``num_scratch`` scratch tokens ``_`` (unscored positions a decoder
can compute in before it answers).

The question is whether a model can learn the task at the sizes it trains on,
so by default the test sizes are the training sizes (no extrapolation).
"""

from __future__ import annotations

from effformer.data.tasks.base import SequenceTask, check_int, register_sequence_task


@register_sequence_task
class InversePermutation(SequenceTask):
    """Undo a permutation: see the module docstring."""

    name = "inverse_permutation"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (2, 8),
        test_lengths: tuple[int, int] = (2, 8),
        *,
        alphabet_size: int = 10,
        num_scratch: int = 0,
        extrapolation: bool = False,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.alphabet_size = check_int("inverse_permutation: alphabet_size", alphabet_size, 2)
        self.num_scratch = check_int("inverse_permutation: num_scratch", num_scratch, 0)
        largest = max(self.train_lengths[1], self.test_lengths[1])
        self.position_symbols = tuple(f"p{i}" for i in range(largest))
        self.letters = tuple(f"s{i}" for i in range(self.alphabet_size))
        self.symbols = self.position_symbols + self.letters + ("|", "_")

    def instance(self, rng, length):
        original = rng.integers(0, self.alphabet_size, length)
        permutation = rng.permutation(length)
        permuted = original[permutation]  # y[i] = x[pi[i]]
        prompt = [self.position_symbols[i] for i in permutation] + ["|"]
        prompt += [self.letters[v] for v in permuted] + ["_"] * self.num_scratch
        return prompt, [self.letters[v] for v in original]

    def max_lengths(self, length):
        return 2 * length + 1 + self.num_scratch, length
