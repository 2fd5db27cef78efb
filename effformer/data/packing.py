"""Packing variable-length sequences into fixed-length rows (padding-free batches).

ByteTransformer removes padding so that no work is spent on it; with XLA's
static shapes the equivalent is to pack several sequences into each row of a
fixed ``[rows, row_length]`` batch and tell the model where each one starts:

* ``segment_ids [rows, row_length]`` int32: 1, 2, ... for the sequences of a
  row in order, 0 for the padding left at the end of the row. Attention uses
  them so that no token sees another sequence (``AttentionMask`` segments).
* ``positions [rows, row_length]`` int32: 0, 1, ... restarting in every
  sequence, so position encodings see each sequence as if it were alone.
* ``weights [rows, row_length]`` float32: the example's own ``weights`` where
  it has them (a task that scores only the answer), else 1 on real tokens; 0
  on padding. The ``causal_lm`` task multiplies the target's weight in, and
  does not let a sequence's last token predict the next sequence's first.

Rows are filled first-fit: each sequence goes into the first row (of those
still open) with room for it, in the order given, so the result is
deterministic. Everything is plain numpy, usable in a grain ``map`` /
``batch`` stage or on its own; :func:`pack_stream` packs an iterator of
examples (a grain dataset iterator, for instance) into batches, one
:class:`BatchPacker` at a time (the input pipeline's ``packing`` option uses
the same packer, see ``effformer.data.pipeline``). :func:`trim_padding` turns a
fixed-width, zero-padded record into the variable-length example packing wants.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

Example = np.ndarray | Mapping[str, Any]

# Features packing creates; an example may bring its own ``weights`` (kept, see above).
PACKING_KEYS = ("segment_ids", "positions")


def _features(example: Example, index: int) -> dict[str, np.ndarray]:
    """The example as ``{name: 1-D array}`` with one common length."""
    features = {"inputs": example} if not isinstance(example, Mapping) else dict(example)
    arrays = {name: np.asarray(value) for name, value in features.items()}
    lengths = {name: value.shape for name, value in arrays.items()}
    if (
        any(len(shape) != 1 for shape in lengths.values())
        or len({shape[0] for shape in lengths.values()}) > 1
    ):
        raise ValueError(
            f"pack_sequences: example {index} must be a 1-D array or a dict of 1-D arrays of "
            f"one length, got shapes {lengths}."
        )
    clash = set(arrays) & set(PACKING_KEYS)
    if clash:
        raise ValueError(
            f"pack_sequences: example {index} has keys {sorted(clash)} that packing creates."
        )
    return arrays


def _first_fit(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Indices of the sequences in each row, filled first-fit in the given order."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index, length in enumerate(lengths):
        if length > row_length:
            raise ValueError(
                f"pack_sequences: sequence {index} has length {length}, longer than the "
                f"row_length {row_length}; truncate or split it first."
            )
        for row, room in enumerate(free):
            if length <= room:
                rows[row].append(index)
                free[row] -= length
                break
        else:
            rows.append([index])
            free.append(row_length - length)
    return rows


def _assemble(
    features: Sequence[dict[str, np.ndarray]],
    rows: Sequence[Sequence[int]],
    row_length: int,
    num_rows: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    names = list(features[0]) if features else ["inputs"]
    for index, example in enumerate(features):
        # Sets, not lists: dicts that list the same features in another order are alike.
        if set(example) != set(names):
            raise ValueError(
                f"pack_sequences: example {index} has keys {sorted(example)}, the first has "
                f"{sorted(names)}; all examples need the same keys."
            )
    # The dtype that holds every example's values (as np.concatenate): the first
    # example's alone could be narrower and wrap the others' values silently.
    packed = {
        name: np.full(
            (num_rows, row_length),
            pad_id,
            np.result_type(*(example[name].dtype for example in features))
            if features
            else np.int32,
        )
        for name in names
    }
    segment_ids = np.zeros((num_rows, row_length), np.int32)
    positions = np.zeros((num_rows, row_length), np.int32)
    own_weights = "weights" in names
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, start=1):
            example = features[index]
            length = len(example[names[0]])
            for name in names:
                packed[name][row, start : start + length] = example[name]
            segment_ids[row, start : start + length] = segment
            positions[row, start : start + length] = np.arange(length)
            start += length
    if own_weights:
        # Padding is never scored, whatever pad value the weights were packed with.
        weights = np.where(segment_ids != 0, packed["weights"], 0).astype(np.float32)
    else:
        weights = (segment_ids != 0).astype(np.float32)
    packed.update(segment_ids=segment_ids, positions=positions, weights=weights)
    return packed


def pack_sequences(
    examples: Sequence[Example],
    row_length: int,
    *,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Pack 1-D sequences (or dicts of equal-length 1-D arrays) into rows.

    Args:
      examples: arrays ``[length_i]``, or dicts of them (e.g. inputs and
        targets); a bare array is packed under the key ``"inputs"``.
      row_length: the length of every row; a longer sequence is an error.
      num_rows: pad the result to this many rows (an error if more are needed);
        default as many as the first-fit packing uses.
      pad_id: the value of padding tokens.
    Returns:
      ``{feature: [rows, row_length], "segment_ids", "positions", "weights"}``.
    """
    if not isinstance(row_length, int) or row_length < 1:
        raise ValueError(f"pack_sequences: row_length must be a positive int, got {row_length!r}.")
    if num_rows is not None and (
        isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0
    ):
        raise ValueError(f"pack_sequences: num_rows must be an int >= 0 or None, got {num_rows!r}.")
    features = [_features(example, index) for index, example in enumerate(examples)]
    lengths = [len(next(iter(f.values()))) if f else 0 for f in features]
    rows = _first_fit(lengths, row_length)
    if num_rows is None:
        num_rows = len(rows)
    elif len(rows) > num_rows:
        raise ValueError(
            f"pack_sequences: the sequences need {len(rows)} rows of {row_length}, more than "
            f"num_rows={num_rows}."
        )
    return _assemble(features, rows, row_length, num_rows, pad_id)


def unpack_sequences(packed: Mapping[str, np.ndarray], key: str = "inputs") -> list[np.ndarray]:
    """The sequences of ``packed[key]`` row by row, segment by segment (inverse of packing)."""
    sequences = []
    for row_values, row_segments in zip(
        np.asarray(packed[key]), np.asarray(packed["segment_ids"]), strict=True
    ):
        for segment in range(1, int(row_segments.max(initial=0)) + 1):
            sequences.append(row_values[row_segments == segment])
    return sequences


class BatchPacker:
    """First-fit packing of examples, in the order added, into one batch of rows.

    ``add`` places an example in the first open row with room, opening a new
    row while fewer than ``rows_per_batch`` are open; it returns False (and
    places nothing) when the example fits nowhere, which is when the batch is
    full. ``pop`` returns the batch, padded to ``rows_per_batch`` rows, and
    starts an empty one. The result depends only on the examples and their
    order, so a stream of batches is reproducible from where a batch starts.
    """

    def __init__(self, row_length: int, rows_per_batch: int, *, pad_id: int = 0):
        if not isinstance(row_length, int) or row_length < 1:
            raise ValueError(f"BatchPacker: row_length must be a positive int, got {row_length!r}.")
        if not isinstance(rows_per_batch, int) or rows_per_batch < 1:
            raise ValueError(
                f"BatchPacker: rows_per_batch must be a positive int, got {rows_per_batch!r}."
            )
        self.row_length = row_length
        self.rows_per_batch = rows_per_batch
        self.pad_id = pad_id
        self._clear()

    def _clear(self) -> None:
        self._examples: list[dict[str, np.ndarray]] = []
        self._rows: list[list[int]] = []
        self._free: list[int] = []

    def __len__(self) -> int:
        """The number of examples in the batch so far."""
        return len(self._examples)

    def add(self, example: Example) -> bool:
        """Places ``example``; False if it fits in no row (the batch is full)."""
        features = _features(example, len(self._examples))
        length = len(next(iter(features.values()))) if features else 0
        if length > self.row_length:
            raise ValueError(
                f"BatchPacker: a sequence has length {length}, longer than the row_length "
                f"{self.row_length}; truncate or split it first."
            )
        row = next((r for r, room in enumerate(self._free) if length <= room), None)
        if row is None:
            if len(self._rows) == self.rows_per_batch:
                return False
            self._rows.append([])
            self._free.append(self.row_length)
            row = len(self._rows) - 1
        self._rows[row].append(len(self._examples))
        self._free[row] -= length
        self._examples.append(features)
        return True

    def pop(self) -> dict[str, np.ndarray]:
        """The packed batch (``pack_sequences``'s layout, ``rows_per_batch`` rows); then empty."""
        packed = _assemble(
            self._examples, self._rows, self.row_length, self.rows_per_batch, self.pad_id
        )
        self._clear()
        return packed


def pack_stream(
    examples: Iterable[Example],
    row_length: int,
    rows_per_batch: int,
    *,
    pad_id: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Pack a stream of examples into batches of ``rows_per_batch`` rows.

    Examples are taken in order into a batch's open rows (first-fit); a batch
    is emitted, padded to ``rows_per_batch`` rows, when the next example fits
    in none of them and all rows are open, and at the end of the stream.
    """
    if not isinstance(rows_per_batch, int) or rows_per_batch < 1:
        raise ValueError(
            f"pack_stream: rows_per_batch must be a positive int, got {rows_per_batch!r}."
        )
    packer = BatchPacker(row_length, rows_per_batch, pad_id=pad_id)
    for example in examples:
        if not packer.add(example):
            yield packer.pop()
            packer.add(example)  # An empty batch always has room for a sequence that fits a row.
    if len(packer):
        yield packer.pop()


def trim_padding(record: Mapping[str, Any], pad_id: int = 0) -> dict[str, np.ndarray]:
    """A fixed-width record -> its 1-D features cut after the last non-padding entry.

    ``record``: 1-D features ``[R]`` (inputs, targets, weights, ...) of one
    width, zero-padded (``pad_id``) at the end, and 0-D per-example features
    (``length``, ``mask``, ...), which are dropped: a packed row holds several
    examples. Only entries equal to ``pad_id`` in EVERY 1-D feature are cut, so
    no token, target or weight is lost. Returns ``{name: [n]}``, n >= 1.
    """
    sequences = {name: np.asarray(value) for name, value in record.items()}
    sequences = {name: value for name, value in sequences.items() if value.ndim != 0}
    shapes = {name: value.shape for name, value in sequences.items()}
    if not sequences or len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(
            "trim_padding: a record needs 1-D features of one width besides its 0-D ones, got "
            f"shapes {shapes}."
        )
    used = np.zeros(next(iter(shapes.values())), bool)
    for value in sequences.values():
        used |= value != pad_id
    length = max(int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0, 1)
    return {name: value[:length] for name, value in sequences.items()}
