"""SCAN (Lake & Baroni, 2018), generated from its grammar, with the length split.

The grammar (the paper's Figure 6, "phrase-structure grammar"):

    C -> S and S | S after S | S
    S -> V twice | V thrice | V
    V -> D opposite left|right | D around left|right | D | U      (D here: U or turn)
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump

and its interpretation ([[.]] of a phrase is a list of actions):

    [[walk]] = I_WALK (look, run, jump alike)    [[turn left]] = I_TURN_LEFT
    [[x left]] = I_TURN_LEFT [[x]]               [[turn opposite left]] = I_TURN_LEFT x 2
    [[x opposite left]] = [[turn opposite left]] [[x]]
    [[turn around left]] = I_TURN_LEFT x 4       [[x around left]] = (I_TURN_LEFT [[x]]) x 4
    [[x twice]] = [[x]] x 2                      [[x thrice]] = [[x]] x 3
    [[x1 and x2]] = [[x1]] [[x2]]                [[x1 after x2]] = [[x2]] [[x1]]

(``right`` alike with I_TURN_RIGHT). The grammar makes exactly 20,910 commands.

The size of an instance is the length of its action sequence. An instance of
size L is a command drawn uniformly from those with L actions. The paper's
length split trains on action sequences of at most 22 actions and tests on
longer ones (24-48; no command has 23, 29, 31, ... actions: :meth:`Scan.sizes`
lists the sizes that exist, and the dataset draws only those). Drawing sizes
uniformly reweights the paper's split, which keeps every command of each side.
"""

from __future__ import annotations

import functools
import itertools

from effformer.data.tasks.base import SequenceTask, register_sequence_task

PRIMITIVES = {"walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"}
TURNS = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}
COMMAND_WORDS = (
    *PRIMITIVES, "turn", *TURNS, "opposite", "around", "twice", "thrice", "and", "after",
)  # fmt: skip
ACTIONS = (*PRIMITIVES.values(), *TURNS.values())
REPETITIONS = {"twice": 2, "thrice": 3}
MAX_COMMAND_WORDS = 9  # e.g. "jump around left thrice after walk opposite right twice"


def interpret(command: list[str] | tuple[str, ...]) -> list[str]:
    """The action sequence of a SCAN ``command`` (a list of words), by the interpretation above.

    Raises ValueError if ``command`` is not a sentence of the grammar.
    """
    words = list(command)
    for conjunction, swap in (("and", False), ("after", True)):
        if conjunction in words:
            split = words.index(conjunction)
            first, second = _interpret_s(words[:split]), _interpret_s(words[split + 1 :])
            return second + first if swap else first + second
    return _interpret_s(words)


def _interpret_s(words: list[str]) -> list[str]:
    if words and words[-1] in REPETITIONS:
        return _interpret_v(words[:-1]) * REPETITIONS[words[-1]]
    return _interpret_v(words)


def _interpret_v(words: list[str]) -> list[str]:
    if len(words) == 1 and words[0] in PRIMITIVES:  # V -> U
        return [PRIMITIVES[words[0]]]
    if len(words) in (2, 3) and words[-1] in TURNS and words[0] in (*PRIMITIVES, "turn"):
        turn = TURNS[words[-1]]
        # "turn" contributes no action of its own: the direction's turns are all it does.
        action = [PRIMITIVES[words[0]]] if words[0] in PRIMITIVES else []
        if len(words) == 2:  # D -> x left|right
            return [turn] + action
        if words[1] == "opposite":
            return [turn, turn] + action
        if words[1] == "around":
            return ([turn] + action) * 4
    raise ValueError(f"interpret: {' '.join(words)!r} is not a SCAN phrase.")


@functools.cache
def commands_by_length() -> dict[int, tuple[tuple[str, ...], ...]]:
    """Every command of the grammar, grouped by the length of its action sequence."""
    verb_phrases = [(u,) for u in PRIMITIVES]
    for x in (*PRIMITIVES, "turn"):
        for direction in TURNS:
            verb_phrases += [(x, direction), (x, "opposite", direction), (x, "around", direction)]
    sentences = [v + r for v in verb_phrases for r in ((), ("twice",), ("thrice",))]
    commands = list(sentences)
    for conjunction in ("and", "after"):
        commands += [a + (conjunction,) + b for a, b in itertools.product(sentences, repeat=2)]
    grouped: dict[int, list[tuple[str, ...]]] = {}
    for command in commands:
        grouped.setdefault(len(interpret(command)), []).append(command)
    return {length: tuple(group) for length, group in sorted(grouped.items())}


@register_sequence_task
class Scan(SequenceTask):
    """SCAN commands -> action sequences, sized by action count (see the module docstring)."""

    name = "scan"

    def __init__(
        self,
        train_lengths: tuple[int, int] = (1, 22),
        test_lengths: tuple[int, int] = (24, 48),
        *,
        extrapolation: bool = True,
    ):
        super().__init__(train_lengths, test_lengths, extrapolation=extrapolation)
        for argument, (low, high) in (
            ("train_lengths", self.train_lengths),
            ("test_lengths", self.test_lengths),
        ):
            if not self.sizes(low, high):
                raise ValueError(
                    f"scan: {argument} {(low, high)} holds no action-sequence length of a SCAN "
                    f"command; the lengths are {sorted(commands_by_length())}."
                )
        self.symbols = COMMAND_WORDS + ACTIONS

    def sizes(self, low, high):
        return tuple(length for length in commands_by_length() if low <= length <= high)

    def instance(self, rng, length):
        group = commands_by_length().get(length)
        if group is None:
            raise ValueError(f"scan: no command has {length} actions.")
        command = group[int(rng.integers(0, len(group)))]
        return list(command), interpret(command)

    def max_lengths(self, length):
        return MAX_COMMAND_WORDS, length
