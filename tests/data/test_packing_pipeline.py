"""The pipeline's packing option: rows reproduce the stream, resume exactly, train an LM."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effformer import models
from effformer.data import create_input_pipeline, default_data_config, get_dataset_info
from effformer.data.packing import trim_padding

DATASET = "copy"  # causal_lm records of 34 tokens; train instances use at most 18.
BATCH = 4


def _pipeline(batch=BATCH, index=0, count=1, **fields):
    config = default_data_config(DATASET)
    config.update(dict(packing=True, **fields))
    return create_input_pipeline(
        config,
        split="train",
        global_batch_size=batch,
        train=True,
        seed=0,
        process_index=index,
        process_count=count,
    )


def _stream(num_examples):
    """The first ``num_examples`` records of the unpacked training stream (same seed)."""
    (batch,) = [
        next(
            create_input_pipeline(
                default_data_config(DATASET),
                split="train",
                global_batch_size=num_examples,
                train=True,
                seed=0,
                process_index=0,
                process_count=1,
            )
        )
    ]
    return [{key: value[i] for key, value in batch.items()} for i in range(num_examples)]


def _segments(batch):
    """Every packed example as {feature: [n]}, with its per-segment positions."""
    out = []
    for row in range(batch["segment_ids"].shape[0]):
        ids = batch["segment_ids"][row]
        for segment in range(1, int(ids.max(initial=0)) + 1):
            where = ids == segment
            out.append({key: batch[key][row][where] for key in ("inputs", "targets", "weights")})
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
    return out


def _key(example):
    return tuple(example[name].tobytes() for name in ("inputs", "targets", "weights"))


@pytest.fixture(scope="module")
def packed_run():
    """Three packed batches and the pipeline state after each."""
    pipeline = _pipeline()
    batches, states = [], []
    for _ in range(3):
        batches.append(next(pipeline))
        states.append(pipeline.get_state())
    return batches, states


def test_packed_rows_hold_the_stream_examples_in_order(packed_run):
    batches, states = packed_run
    ends = [state["next_example"] for state in states]
    stream = _stream(ends[-1])
    start = 0
    for batch, end in zip(batches, ends, strict=True):
        assert batch["inputs"].shape == (BATCH, 34) and batch["mask"].all()
        assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions", "mask"}
        # Batch k holds exactly the stream examples [start, end), without their padding.
        expected = sorted(_key(trim_padding(record)) for record in stream[start:end])
        assert sorted(_key(example) for example in _segments(batch)) == expected
        # Packing pays: more examples than rows, and padding is never scored.
        assert end - start > BATCH
        assert not batch["weights"][batch["segment_ids"] == 0].any()
        start = end
    # A batch ends only when the next example fits in none of its rows.
    first_next = len(trim_padding(stream[ends[0]])["inputs"])
    free = (batches[0]["segment_ids"] == 0).sum(axis=1)
    assert first_next > free.max()


def test_resume_continues_with_the_same_batches(packed_run):
    batches, states = packed_run
    resumed = _pipeline()
    resumed.set_state(json.loads(json.dumps(states[0])))
    for expected in batches[1:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert resumed.get_state() == states[-1]


def test_hosts_take_interleaved_rows_of_the_global_batch(packed_run):
    batches, _ = packed_run
    hosts = [next(_pipeline(index=i, count=2)) for i in range(2)]
    for key in batches[0]:
        np.testing.assert_array_equal(hosts[0][key], batches[0][key][0::2])
        np.testing.assert_array_equal(hosts[1][key], batches[0][key][1::2])


def _one_example_per_row(records, rows):
    """The records, each alone in a row (segment 1, then padding), in batches of ``rows``."""
    batches = []
    for start in range(0, len(records), rows):
        chunk = [trim_padding(record) for record in records[start : start + rows]]
        chunk += [{key: np.zeros(1, value.dtype) for key, value in chunk[0].items()}] * (
            rows - len(chunk)
        )
        batch = {}
        for key in chunk[0]:
            batch[key] = np.stack([np.pad(c[key], (0, 34 - len(c[key]))) for c in chunk])
        lengths = np.array([len(c["inputs"]) for c in chunk])
        batch["segment_ids"] = (np.arange(34) < lengths[:, None]).astype(np.int32)
        batch["positions"] = np.broadcast_to(np.arange(34, dtype=np.int32), (rows, 34)).copy()
        batch["mask"] = np.arange(rows) < len(records) - start
        batches.append(batch)
    return batches


def test_packed_loss_and_gradients_equal_one_example_per_row_and_a_tiny_lm_trains(packed_run):
    """The causal-LM loss of a packed batch is the sum of its examples' losses, each alone.

    Then a tiny LM takes a few optimizer steps on packed batches through the same task.
    (The trainer itself is not run here: that costs ~10 s of compilation; the task,
    model and pipeline state are what packing changes.) One compiled step serves the
    packed batch, the reference (same shape) and training.
    """
    from effformer.train.tasks import CausalLMTask

    batches, states = packed_run
    reference = _one_example_per_row(_stream(states[0]["next_example"]), BATCH)
    info = get_dataset_info(default_data_config(DATASET))
    task = CausalLMTask(None, info)
    model = models.create("lm_decoder", tiny=True, vocab_size=info.vocab_size)
    # Random parameters from the shapes alone: no init program to compile.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.dummy_inputs(1))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes
    )

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, batch):
        """(loss sum, weight), gradients, and the parameters after one Adam step."""

        def loss(params):
            logits = model.apply({"params": params}, **task.model_inputs(batch))
            loss_sum, count, _ = task.loss_and_metrics(logits, batch)
            return loss_sum, count

        value, grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return value, grads, optax.apply_updates(params, updates), opt_state

    def device(batch):
        return {key: jnp.asarray(value) for key, value in batch.items()}

    opt_state = optimizer.init(params)
    padded_sum = padded_count = 0.0
    padded_grads = jax.tree.map(jnp.zeros_like, params)
    for batch in reference:
        (loss_sum, count), grads, _, _ = step(params, opt_state, device(batch))
        padded_sum, padded_count = padded_sum + loss_sum, padded_count + count
        padded_grads = jax.tree.map(jnp.add, padded_grads, grads)
    losses = []
    for index, batch in enumerate([*batches, batches[0]]):
        (loss_sum, count), grads, params, opt_state = step(params, opt_state, device(batch))
        losses.append(float(loss_sum / count))
        if index == 0:
            weight = sum(batch["weights"].sum() for batch in reference)
            assert float(count) == float(padded_count) == weight > 0
            np.testing.assert_allclose(loss_sum, padded_sum, rtol=1e-5)
            for packed_grad, padded_grad in zip(
                jax.tree.leaves(grads), jax.tree.leaves(padded_grads), strict=True
            ):
                np.testing.assert_allclose(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)
    # After three steps on packed batches the LM fits the first one better.
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_bad_packing_configs_raise():
    with pytest.raises(ValueError, match=r"field 'packing': expected False for 'copy_seq2seq'"):
        get_dataset_info({**default_data_config("copy_seq2seq").to_dict(), "packing": True})
    with pytest.raises(ValueError, match=r"field 'packing': expected False for 'mnist1d'"):
        get_dataset_info({**default_data_config("mnist1d").to_dict(), "packing": True})
    with pytest.raises(ValueError, match="field 'packing_row_length': expected a positive int"):
        get_dataset_info({**default_data_config(DATASET).to_dict(), "packing_row_length": 0})
    with pytest.raises(ValueError, match="field 'packing': expected a bool, got 1"):
        get_dataset_info({**default_data_config(DATASET).to_dict(), "packing": 1})
    # An example longer than the row fails when it is read, naming the field and the fix.
    short = _pipeline(packing_row_length=6)
    with pytest.raises(ValueError, match=r"'packing_row_length': the example at stream position"):
        for _ in range(3):
            next(short)
    # A state of the unpacked stream does not restore a packed pipeline, nor the reverse.
    unpacked = create_input_pipeline(
        default_data_config(DATASET), split="train", global_batch_size=BATCH, train=True,
        seed=0, process_index=0, process_count=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"state\['packing'\] is None but this pipeline has True"):
        _pipeline().set_state(unpacked.get_state())
    with pytest.raises(ValueError, match=r"state\['packing'\] is True but this pipeline has None"):
        unpacked.set_state(_pipeline().get_state())
    state = {**_pipeline().get_state(), "next_example": -1}
    with pytest.raises(ValueError, match=r"state\['next_example'\] must be an int >= 0"):
        _pipeline().set_state(state)
