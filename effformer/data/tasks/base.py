"""Generated sequence tasks: vocabulary, the task interface, and the dataset they become.

A task (:class:`SequenceTask`) makes one instance of a given size ``length``
from a numpy generator: a prompt and an answer, both lists of symbols (strings).
:class:`TaskDataset` turns a task into a dataset of the data registry:

* splits ``train`` (sizes drawn uniformly from ``train_lengths``), ``test``
  (the training sizes) and ``test_long`` (``test_lengths``, longer than
  training when the task extrapolates); the test splits cycle through their
  sizes so that every size gets the same number of examples (within one, when
  the split's size is not a multiple of the number of sizes). A task whose
  sizes have gaps (SCAN: no command has 23 actions) lists the sizes it can
  make in :meth:`SequenceTask.sizes`; the splits draw from those only;
* example ``i`` of split ``s`` is computed from ``numpy.random.default_rng(
  [seed, split number, i])``: deterministic, random access, nothing stored;
* every split has the same static row length (the longest instance over all
  splits), so batches have one shape.

Formats (``DatasetInfo.task`` names the trainer task that reads them):

* ``causal_lm``: the row ``prompt <sep> answer <eos>``, zero-padded;
  ``inputs`` [R], ``targets`` [R] (the next token), ``weights`` [R] = 1 where
  the target is an answer token or ``<eos>`` (the loss is on the answer only).
* ``seq2seq``: ``inputs`` [Rs] = the prompt, ``targets`` [Rt] = ``answer <eos>``,
  ``weights`` [Rt] on the answer; both zero-padded.

Both also hold ``length`` (the instance size, for bucketing) and
``prompt_length`` (tokens before the answer: prompt plus ``<sep>`` in causal_lm).
Token 0 is padding everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from effformer.data.registry import DatasetInfo

PAD, SEP, EOS = "<pad>", "<sep>", "<eos>"
SPECIAL_SYMBOLS = (PAD, SEP, EOS)
FORMATS = ("causal_lm", "seq2seq")
SPLITS = ("train", "test", "test_long")


class Vocabulary:
    """Symbols <-> token ids; ids 0, 1, 2 are ``<pad>``, ``<sep>``, ``<eos>``."""

    def __init__(self, symbols: Sequence[str]):
        symbols = tuple(symbols)
        duplicates = sorted(
            {s for s in symbols if symbols.count(s) > 1} | set(symbols) & set(SPECIAL_SYMBOLS)
        )
        if duplicates:
            raise ValueError(
                f"Vocabulary: symbols must be unique and not special, got {duplicates}."
            )
        self.symbols = SPECIAL_SYMBOLS + symbols
        self._ids = {symbol: index for index, symbol in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, symbols: Sequence[str]) -> list[int]:
        try:
            return [self._ids[symbol] for symbol in symbols]
        except KeyError as error:
            raise ValueError(
                f"Vocabulary.encode: symbol {error.args[0]!r} is not in the vocabulary "
                f"{self.symbols[len(SPECIAL_SYMBOLS) :]}."
            ) from None

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.symbols[int(i)] for i in ids]


def check_length_range(name: str, value: Any) -> tuple[int, int]:
    """``value`` as an inclusive (low, high) range of positive ints, or a ValueError naming it."""
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value)
        or not 1 <= value[0] <= value[1]
    ):
        raise ValueError(
            f"{name}: expected a (low, high) pair of ints with 1 <= low <= high, got {value!r}."
        )
    return int(value[0]), int(value[1])


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}.")
    return int(value)


def digits(value: int, base: int, width: int | None = None) -> list[str]:
    """``value`` in ``base``, most significant digit first (zero-padded to ``width``)."""
    out = []
    while True:
        value, digit = divmod(value, base)
        out.append(str(digit))
        if value == 0 and (width is None or len(out) >= width):
            return out[::-1]


class SequenceTask:
    """One family of generated instances.

    Subclasses set ``name``, build ``symbols`` in ``__init__`` (after calling
    this one) and define :meth:`instance` and :meth:`max_lengths`.

    Attributes:
      train_lengths, test_lengths: inclusive (low, high) ranges of the instance size.
      extrapolation: the test range must lie above the training range.
    """

    name = ""
    symbols: tuple[str, ...] = ()

    def __init__(
        self,
        train_lengths: tuple[int, int],
        test_lengths: tuple[int, int],
        *,
        extrapolation: bool = True,
    ):
        self.train_lengths = check_length_range(f"{self.name}: train_lengths", train_lengths)
        self.test_lengths = check_length_range(f"{self.name}: test_lengths", test_lengths)
        self.extrapolation = extrapolation
        if extrapolation and self.test_lengths[0] <= self.train_lengths[1]:
            raise ValueError(
                f"{self.name}: test_lengths {self.test_lengths} overlap train_lengths "
                f"{self.train_lengths}, but the split requires extrapolation: the lowest test "
                f"length must exceed {self.train_lengths[1]}."
            )

    def instance(self, rng: np.random.Generator, length: int) -> tuple[list[str], list[str]]:
        """(prompt symbols, answer symbols) of one instance of size ``length``."""
        raise NotImplementedError

    def max_lengths(self, length: int) -> tuple[int, int]:
        """Upper bounds on (prompt, answer) symbol counts at size ``length``."""
        raise NotImplementedError

    def sizes(self, low: int, high: int) -> tuple[int, ...]:
        """The sizes in [low, high] that :meth:`instance` can make: all of them by default."""
        return tuple(range(low, high + 1))

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.symbols)


def _split_lengths(task: SequenceTask) -> dict[str, tuple[int, int]]:
    return {"train": task.train_lengths, "test": task.train_lengths, "test_long": task.test_lengths}


class TaskDataset:
    """A :class:`SequenceTask` as a dataset of the registry (see the module docstring).

    Args:
      task: the generator.
      name: the dataset name.
      format: ``"causal_lm"`` or ``"seq2seq"``.
      seed: the seed every example derives from.
      num_examples: examples per split, e.g. ``{"train": 20000, "test": 512, "test_long": 512}``.
    """

    def __init__(
        self,
        task: SequenceTask,
        *,
        name: str,
        format: str = "causal_lm",
        seed: int = 0,
        num_examples: dict[str, int] | None = None,
    ):
        if format not in FORMATS:
            raise ValueError(f"TaskDataset: format must be one of {FORMATS}, got {format!r}.")
        num_examples = dict(num_examples or {"train": 20000, "test": 512, "test_long": 512})
        if set(num_examples) != set(SPLITS):
            raise ValueError(
                f"TaskDataset: num_examples must have the splits {SPLITS}, got {sorted(num_examples)}."
            )
        for split, count in num_examples.items():
            check_int(f"TaskDataset: num_examples[{split!r}]", count, 1)
        self.task = task
        self.name = name
        self.format = format
        self.seed = check_int("TaskDataset: seed", seed, 0)
        self.num_examples = num_examples
        self.split_lengths = _split_lengths(task)
        self.split_sizes = {split: task.sizes(*r) for split, r in self.split_lengths.items()}
        for split, sizes in self.split_sizes.items():
            if not sizes:
                raise ValueError(
                    f"{name}: task {task.name!r} can make no instance with a size in "
                    f"{self.split_lengths[split]} (split {split!r})."
                )
        self.vocabulary = task.vocabulary
        largest = max(high for _, high in self.split_lengths.values())
        prompt, answer = task.max_lengths(largest)
        # Bounds grow with the size, so the largest size bounds every split.
        self.max_prompt_length, self.max_answer_length = prompt, answer
        if format == "causal_lm":
            self.row_lengths = {"inputs": prompt + answer + 2}
        else:
            self.row_lengths = {"inputs": prompt, "targets": answer + 1}
        self.info = DatasetInfo(
            name=name,
            task=format,
            num_classes=len(self.vocabulary),
            input_shape=(self.row_lengths["inputs"],),
            splits=dict(num_examples),
            train_split="train",
            eval_split="test",
            vocab_size=len(self.vocabulary),
        )

    # ------------------------------------------------------------------ examples
    def instance(self, split: str, index: int) -> tuple[int, list[str], list[str]]:
        """(size, prompt symbols, answer symbols) of example ``index`` of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {split!r}.")
        if not 0 <= index < self.num_examples[split]:
            raise IndexError(
                f"{self.name}: index {index} out of range for split {split!r} "
                f"({self.num_examples[split]} examples)."
            )
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        sizes = self.split_sizes[split]
        if split == "train":
            length = sizes[int(rng.integers(0, len(sizes)))]
        else:
            length = sizes[index % len(sizes)]
        prompt, answer = self.task.instance(rng, length)
        max_prompt, max_answer = self.task.max_lengths(length)
        if len(prompt) > max_prompt or len(answer) > max_answer:
            raise AssertionError(
                f"{self.name}: instance of size {length} has prompt/answer lengths "
                f"{len(prompt)}/{len(answer)} above max_lengths {max_prompt}/{max_answer}."
            )
        return length, prompt, answer

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """The record of example ``index`` of ``split`` (arrays as the module docstring says)."""
        length, prompt, answer = self.instance(split, index)
        return self.format_example(length, prompt, answer)

    def format_example(
        self, length: int, prompt: list[str], answer: list[str]
    ) -> dict[str, np.ndarray]:
        encode = self.vocabulary.encode
        sep, eos = encode([SEP, EOS])
        if self.format == "causal_lm":
            tokens = encode(prompt) + [sep] + encode(answer) + [eos]
            row = self.row_lengths["inputs"]
            inputs = np.zeros(row, np.int32)
            inputs[: len(tokens)] = tokens
            targets = np.zeros(row, np.int32)
            targets[: len(tokens) - 1] = tokens[1:]
            weights = np.zeros(row, np.float32)
            # Position len(prompt) holds <sep>, which predicts the first answer token.
            weights[len(prompt) : len(tokens) - 1] = 1.0
            prompt_length = len(prompt) + 1
        else:
            inputs = np.zeros(self.row_lengths["inputs"], np.int32)
            inputs[: len(prompt)] = encode(prompt)
            answer_tokens = encode(answer) + [eos]
            targets = np.zeros(self.row_lengths["targets"], np.int32)
            targets[: len(answer_tokens)] = answer_tokens
            weights = (np.arange(targets.size) < len(answer_tokens)).astype(np.float32)
            prompt_length = len(prompt)
        return {
            "inputs": inputs,
            "targets": targets,
            "weights": weights,
            "length": np.int32(length),
            "prompt_length": np.int32(prompt_length),
        }

    def empty_example(self) -> dict[str, np.ndarray]:
        """An all-padding record (weights 0) of the same shapes, for padding eval batches."""
        template = self.format_example(1, [], [])
        return {key: np.zeros_like(value) for key, value in template.items()}

    # ----------------------------------------------------- the registry's interface
    def as_data_source(self, split: str) -> TaskSource:
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {split!r}.")
        return TaskSource(self, split)

    def example_transform(self) -> AddMask:
        return AddMask()

    def eval_example(self, source: TaskSource) -> PaddedEvalExample:
        return PaddedEvalExample(source, self.empty_example())


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """grain random-access source over one split (picklable for grain workers)."""

    dataset: TaskDataset
    split: str

    def __len__(self) -> int:
        return self.dataset.num_examples[self.split]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.dataset.example(self.split, int(index))


class AddMask:
    """``(position, record) -> record`` plus ``mask=True``: token examples need no preprocessing."""

    def __call__(self, position: int, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        del position
        return {**record, "mask": np.bool_(True)}


class PaddedEvalExample:
    """``index -> example`` over a split padded to whole batches with ``mask=False`` rows."""

    def __init__(self, source: TaskSource, empty: dict[str, np.ndarray]):
        self.source = source
        self.empty = empty

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index < len(self.source):
            return {**self.source[index], "mask": np.bool_(True)}
        return {**self.empty, "mask": np.bool_(False)}


# ---------------------------------------------------------------------- task registry

TASKS: dict[str, type[SequenceTask]] = {}


def register_sequence_task(cls: type[SequenceTask]) -> type[SequenceTask]:
    """Class decorator: makes ``cls`` available to :func:`make_task` as ``cls.name``."""
    if not cls.name or cls.name in TASKS:
        raise ValueError(f"register_sequence_task: name {cls.name!r} is empty or taken.")
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, **kwargs: Any) -> SequenceTask:
    """The task ``name`` (see ``TASKS``) built with ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"make_task: unknown task {name!r}; known tasks: {sorted(TASKS)}.")
    return TASKS[name](**kwargs)
