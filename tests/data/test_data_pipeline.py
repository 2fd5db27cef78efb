"""Input pipelines: determinism, resume, epochs, per-host sharding, eval padding."""

import json

import numpy as np
import pytest

from effformer.data import create_input_pipeline, validate_data_config
from effformer.data.preprocess import ExampleTransform
from effformer.data.registry import get_dataset_spec, load_builder

AUGMENTED = dict(
    crop_padding=2,
    flip=True,
    randaugment_num_layers=2,
    randaugment_magnitude=9.0,
    random_erasing=0.5,
)


def _pipeline(config, *, split="train", batch=16, train=True, seed=0, index=0, count=1):
    return create_input_pipeline(
        config,
        split=split,
        global_batch_size=batch,
        train=train,
        seed=seed,
        process_index=index,
        process_count=count,
    )


def _take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        for key in ("inputs", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])


def _rows(inputs):
    """Each example's inputs as bytes: an identity for mnist1d (all signals differ)."""
    return [row.tobytes() for row in inputs]


def test_train_batch_format(make_config):
    (batch,) = _take(_pipeline(make_config("digits", **AUGMENTED)), 1)
    assert batch["inputs"].shape == (16, 8, 8, 1) and batch["inputs"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["mask"].shape == (16,) and batch["mask"].all()


def test_same_seed_same_batches_other_seed_other_batches(make_config):
    config = make_config("digits", **AUGMENTED)
    first = _take(_pipeline(config, seed=3), 3)
    _assert_same(first, _take(_pipeline(config, seed=3), 3))
    other = _take(_pipeline(config, seed=4), 3)
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


def test_augmentation_depends_on_seed_and_stream_position_only(make_config, data_dir):
    spec = get_dataset_spec("digits")
    config = validate_data_config(make_config("digits", **AUGMENTED))
    record = load_builder(spec, data_dir).as_data_source("test")[0]
    transform = ExampleTransform(spec, config, train=True, seed=0)
    again = ExampleTransform(spec, config, train=True, seed=0)
    np.testing.assert_array_equal(transform(5, record)["inputs"], again(5, record)["inputs"])
    # Position 5 + 360 is the same example of the test split in the next epoch.
    assert not np.array_equal(transform(5, record)["inputs"], transform(365, record)["inputs"])
    other_seed = ExampleTransform(spec, config, train=True, seed=1)
    assert not np.array_equal(transform(5, record)["inputs"], other_seed(5, record)["inputs"])


@pytest.mark.parametrize("train", [True, False])
def test_resume_continues_exactly(make_config, train):
    config = make_config("digits", **AUGMENTED)
    # Train: 6 batches of 72 cross the end of the first epoch (360 examples).
    uninterrupted = _take(_pipeline(config, train=train, split="test", batch=72), 5 + train)
    interrupted = _pipeline(config, train=train, split="test", batch=72)
    _assert_same(_take(interrupted, 3), uninterrupted[:3])
    state = json.loads(json.dumps(interrupted.get_state()))
    restored = _pipeline(config, train=train, split="test", batch=72)
    restored.set_state(state)
    _assert_same(_take(restored, 2 + train), uninterrupted[3:])


def test_state_of_another_stream_is_refused(make_config):
    state = _pipeline(make_config("digits"), seed=1).get_state()
    with pytest.raises(ValueError, match=r"state\['seed'\] is 1 but this pipeline has 2"):
        _pipeline(make_config("digits"), seed=2).set_state(state)
    with pytest.raises(ValueError, match=r"next_batch"):
        _pipeline(make_config("digits"), seed=1).set_state({**state, "next_batch": -1})


def test_each_epoch_is_a_new_permutation_of_the_split(make_config):
    config = make_config("mnist1d")
    (everything,) = list(_pipeline(config, split="test", train=False, batch=1000))
    all_rows = sorted(_rows(everything["inputs"]))
    assert len(set(all_rows)) == 1000
    batches = _take(_pipeline(config, split="test", batch=100, seed=7), 20)
    epochs = [np.concatenate([b["inputs"] for b in batches[i : i + 10]]) for i in (0, 10)]
    assert sorted(_rows(epochs[0])) == all_rows
    assert sorted(_rows(epochs[1])) == all_rows
    assert _rows(epochs[0]) != _rows(epochs[1])


def test_neighbouring_seeds_do_not_share_orders_an_epoch_apart(make_config):
    # grain shuffles epoch e with its seed + e: were the run's seed passed straight
    # through, seed 7's second epoch would be seed 8's first (the same stream, shifted).
    config = make_config("mnist1d")
    seven = _take(_pipeline(config, split="test", batch=100, seed=7), 20)
    eight = _take(_pipeline(config, split="test", batch=100, seed=8), 10)
    second_epoch_of_seven = _rows(np.concatenate([b["inputs"] for b in seven[10:]]))
    first_epoch_of_eight = _rows(np.concatenate([b["inputs"] for b in eight]))
    assert sorted(second_epoch_of_seven) == sorted(first_epoch_of_eight)  # both whole epochs
    assert second_epoch_of_seven != first_epoch_of_eight


def test_batches_straddle_epochs_without_dropping_examples(make_config):
    # 1000 examples in batches of 750: the second batch ends the first epoch.
    config = make_config("mnist1d")
    first, second = _take(_pipeline(config, split="test", batch=750), 2)
    epoch = _rows(np.concatenate([first["inputs"], second["inputs"][:250]]))
    assert len(set(epoch)) == 1000


@pytest.mark.parametrize("train", [True, False])
def test_hosts_split_each_global_batch(make_config, train):
    config = make_config("mnist1d")
    split = "test"
    single = _take(_pipeline(config, split=split, batch=96, train=train), 3)
    hosts = [
        _take(_pipeline(config, split=split, batch=96, train=train, index=i, count=2), 3)
        for i in range(2)
    ]
    for step in range(3):
        host_rows = [set(_rows(host[step]["inputs"])) for host in hosts]
        assert all(len(rows) == 48 for rows in host_rows)
        assert host_rows[0].isdisjoint(host_rows[1])
        assert host_rows[0] | host_rows[1] == set(_rows(single[step]["inputs"]))


def test_hosts_together_cover_the_epoch(make_config):
    config = make_config("mnist1d")
    batches = [
        _take(_pipeline(config, split="test", batch=200, index=i, count=2), 5) for i in range(2)
    ]
    rows = [_rows(np.concatenate([b["inputs"] for b in host])) for host in batches]
    assert set(rows[0]).isdisjoint(rows[1])
    assert len(set(rows[0]) | set(rows[1])) == 1000


@pytest.mark.parametrize("count", [1, 2])
def test_eval_pads_last_batch_and_counts_each_example_once(make_config, count):
    config = make_config("digits")
    seen = []
    for index in range(count):
        pipeline = _pipeline(config, split="test", batch=64, train=False, index=index, count=count)
        batches = list(pipeline)
        assert len(batches) == pipeline.num_batches == 6  # ceil(360 / 64)
        for batch in batches:
            assert batch["inputs"].shape == (64 // count, 8, 8, 1)
            padding = ~batch["mask"]
            assert (batch["inputs"][padding] == 0).all() and (batch["label"][padding] == 0).all()
            seen.append(batch)
    assert sum(int(b["mask"].sum()) for b in seen) == 360
    (reference,) = list(_pipeline(config, split="test", batch=360, train=False))
    kept = np.concatenate([b["inputs"][b["mask"]] for b in seen])
    assert sorted(_rows(kept)) == sorted(_rows(reference["inputs"]))


def test_eval_is_in_stored_order_and_unaugmented(make_config):
    augmented = make_config("digits", **AUGMENTED)
    a = list(_pipeline(augmented, split="test", batch=100, train=False))
    b = list(_pipeline(make_config("digits"), split="test", batch=100, train=False, seed=5))
    _assert_same(a, b)


def test_bad_arguments(make_config):
    config = make_config("digits")
    with pytest.raises(
        ValueError, match="global_batch_size: expected a multiple of process_count=3"
    ):
        _pipeline(config, batch=16, count=3)
    with pytest.raises(ValueError, match=r"process_index: expected a value in \[0, 2\), got 2"):
        _pipeline(config, index=2, count=2)
    with pytest.raises(
        ValueError, match=r"split: expected one of \['test', 'train'\].*'validation'"
    ):
        _pipeline(config, split="validation")
    with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*32\)"):
        _pipeline(config, seed=2**32)
    with pytest.raises(ValueError, match="global_batch_size: expected an int >= 1, got 0"):
        _pipeline(config, batch=0)
