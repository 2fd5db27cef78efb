"""Packing sequences into rows: contents preserved, structure right, bad input refused."""

import numpy as np
import pytest

from effformer.data.packing import pack_sequences, pack_stream, trim_padding, unpack_sequences


def _sequences(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, size=n).astype(np.int32) for n in lengths]


def test_first_fit_rows_segments_positions_and_weights():
    sequences = _sequences([4, 3, 5, 2, 1])
    packed = pack_sequences(sequences, 6)
    # First fit: [4, 2] [3, 1] [5] -- the 2 goes back to row 0, the 1 to row 1.
    np.testing.assert_array_equal(
        packed["segment_ids"],
        [[1, 1, 1, 1, 2, 2], [1, 1, 1, 2, 0, 0], [1, 1, 1, 1, 1, 0]],
    )
    np.testing.assert_array_equal(
        packed["positions"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 0]]
    )
    np.testing.assert_array_equal(packed["weights"], packed["segment_ids"] != 0)
    assert packed["inputs"][1, 4:].tolist() == [0, 0]
    unpacked = unpack_sequences(packed)
    order = [0, 3, 1, 4, 2]
    for got, index in zip(unpacked, order, strict=True):
        np.testing.assert_array_equal(got, sequences[index])


def test_dict_examples_pack_every_feature_and_num_rows_pads():
    examples = [{"inputs": s, "targets": s + 1} for s in _sequences([3, 3, 2], seed=1)]
    packed = pack_sequences(examples, 8, num_rows=3, pad_id=-1)
    assert packed["inputs"].shape == packed["targets"].shape == (3, 8)
    real = packed["segment_ids"] != 0
    np.testing.assert_array_equal(packed["targets"][real], packed["inputs"][real] + 1)
    assert np.all(packed["inputs"][~real] == -1) and not real[1:].any()


def test_stream_packs_in_order_into_batches_of_rows():
    sequences = _sequences([5, 5, 5, 2, 4, 6], seed=2)
    batches = list(pack_stream(iter(sequences), 6, rows_per_batch=2))
    assert all(b["inputs"].shape == (2, 6) for b in batches)
    flat = [s for b in batches for s in unpack_sequences(b)]
    assert sorted(map(len, flat)) == sorted(map(len, sequences))
    assert sum(int((b["segment_ids"] != 0).sum()) for b in batches) == 27


def test_examples_own_weights_are_kept_and_padding_is_never_weighted():
    examples = [
        {"inputs": np.array([1, 2, 3]), "weights": np.array([0.0, 1.0, 1.0])},
        {"inputs": np.array([4, 5]), "weights": np.array([1.0, 0.0])},
    ]
    packed = pack_sequences(examples, 6, pad_id=-1)
    np.testing.assert_array_equal(packed["weights"], [[0, 1, 1, 1, 0, 0]])
    assert packed["weights"].dtype == np.float32


def test_trim_padding_cuts_only_what_every_feature_pads():
    record = {
        "inputs": np.array([3, 4, 0, 0, 0]),
        "targets": np.array([4, 0, 9, 0, 0]),
        "weights": np.array([1.0, 0.0, 0.0, 0.0, 0.0]),
        "length": np.int32(2),
    }
    trimmed = trim_padding(record)
    assert sorted(trimmed) == ["inputs", "targets", "weights"]  # 0-D features dropped
    np.testing.assert_array_equal(trimmed["targets"], [4, 0, 9])
    np.testing.assert_array_equal(trimmed["inputs"], [3, 4, 0])
    assert len(trim_padding({"inputs": np.zeros(4, np.int32)})["inputs"]) == 1
    with pytest.raises(ValueError, match="1-D features of one width"):
        trim_padding({"inputs": np.ones(4), "targets": np.ones(3)})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pack_sequences(_sequences([3, 9]), 8), "sequence 1 has length 9, longer than"),
        (lambda: pack_sequences(_sequences([3]), 0), "row_length must be a positive int"),
        (lambda: pack_sequences(_sequences([5, 5]), 6, num_rows=1), "need 2 rows of 6, more than"),
        (lambda: pack_sequences([np.zeros((2, 2))], 6), "must be a 1-D array or a dict"),
        (
            lambda: pack_sequences([{"inputs": np.ones(2), "positions": np.ones(2)}], 6),
            "keys \\['positions'\\] that packing creates",
        ),
        (lambda: list(pack_stream(_sequences([7]), 6, 2)), "length 7, longer than the row_length"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_examples_with_keys_in_another_order_or_wider_dtypes_pack_exactly():
    # Dicts listing the same features in another order are the same kind of example.
    examples = [
        {"inputs": np.array([1, 2]), "targets": np.array([2, 3])},
        {"targets": np.array([5, 6]), "inputs": np.array([4, 5])},
    ]
    packed = pack_sequences(examples, 4)
    np.testing.assert_array_equal(packed["inputs"], [[1, 2, 4, 5]])
    np.testing.assert_array_equal(packed["targets"], [[2, 3, 5, 6]])
    # A first example of a narrow dtype must not wrap the values of the next ones.
    narrow_first = [np.array([1, 2], np.int8), np.array([1000, 70000], np.int32)]
    packed = pack_sequences(narrow_first, 4)
    np.testing.assert_array_equal(packed["inputs"], [[1, 2, 1000, 70000]])
    assert unpack_sequences(packed)[1].tolist() == [1000, 70000]
    batch = next(pack_stream(iter(narrow_first), 4, rows_per_batch=1))
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, 1000, 70000]])


@pytest.mark.parametrize("num_rows", [-1, 2.0, True])
def test_bad_num_rows_is_named(num_rows):
    with pytest.raises(ValueError, match=f"num_rows must be an int >= 0 or None, got {num_rows!r}"):
        pack_sequences([], 4, num_rows=num_rows)
