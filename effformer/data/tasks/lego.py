"""LEGO (Zhang et al., 2022, "Unveiling Transformers with LEGO"): resolve a chain of assignments.

An instance of size n is a chain of n clauses over n distinct variables drawn
from the first ``num_variables`` letters: the root ``v_1 = s_1 1`` and
``v_k = s_k v_{k-1}`` for k = 2..n, each sign ``s_k`` in {+, -}, so that
``value(v_1) = s_1 1`` and ``value(v_k) = s_k value(v_{k-1})``. The clauses are
shuffled (the paper's setting: the order of the chain is not the order of the
text) and written ``v = s operand`` separated by ``;``, e.g. ``b = - a ; a = + 1``.

The answer is the value of every variable, ``+1`` or ``-1``, in the order the
clauses appear in the prompt (the paper scores the prediction made at each
clause's variable). Sizes: the number of clauses; by default train 1-6 and test
7-12 (the paper's chains have 12 variables).

Only the paper's basic group ({+1, -1} under multiplication) is generated.
"""

from __future__ import annotations

import string

from effformer.data.tasks.base import SequenceTask, check_int, register_sequence_task

VALUE_SYMBOLS = {1: "+1", -1: "-1"}
SIGNS = {"+": 1, "-": -1}


@register_sequence_task
class Lego(SequenceTask):
    """Values of a shuffled chain of sign assignments (see the module docstring)."""

    name = "lego"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 6),
        test_lengths: tuple[int, int] = (7, 12),
        *,
        num_variables: int = 26,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        self.num_variables = check_int("lego: num_variables", num_variables, 1)
        if self.num_variables > len(string.ascii_lowercase):
            raise ValueError(
                f"lego: num_variables must be at most {len(string.ascii_lowercase)} (variables "
                f"are the letters a-z), got {num_variables}."
            )
        largest = max(self.train_lengths[1], self.test_lengths[1])
        if largest > self.num_variables:
            raise ValueError(
                f"lego: a chain of {largest} clauses needs {largest} distinct variables, but "
                f"num_variables is {self.num_variables}."
            )
        self.variables = tuple(string.ascii_lowercase[: self.num_variables])
        self.symbols = self.variables + ("=", "+", "-", "1", ";") + tuple(VALUE_SYMBOLS.values())

    def instance(self, rng, length):
        chain = [self.variables[i] for i in rng.choice(self.num_variables, length, replace=False)]
        signs = ["+-"[i] for i in rng.integers(0, 2, length)]
        values, value = {}, 1
        for variable, sign in zip(chain, signs, strict=True):  # Down the chain from the root.
            value = SIGNS[sign] * value
            values[variable] = value
        operands = ["1", *chain[:-1]]
        prompt: list[str] = []
        order = rng.permutation(length)
        for k, position in enumerate(order):
            prompt += ([";"] if k else []) + [chain[position], "=", signs[position]]
            prompt.append(operands[position])
        return prompt, [VALUE_SYMBOLS[values[chain[position]]] for position in order]

    def max_lengths(self, length):
        return 5 * length - 1, length
