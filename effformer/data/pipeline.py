"""Input pipelines: TFDS data sources read through grain, per-host batches.

Train pipelines form one global stream of examples: the split shuffled with
``seed`` (grain's index shuffle, a new permutation each epoch, seeded with
``shuffle_seed(seed) + epoch``), repeated forever. The stream is cut into global batches of
``global_batch_size`` consecutive examples; host p of P takes the examples at
stream positions congruent to p mod P, so its k-th batch holds its share of
global batch k. The hosts' batches are therefore disjoint, and together they
are exactly the global batch a single-host pipeline would produce, whatever
P is. Batches may straddle an epoch boundary: every example is used once per
epoch and no batch is ever partial, so there is no remainder to drop.

Eval pipelines make one pass over the split in stored order, padded with
``mask=False`` examples to a whole number of global batches, sharded the same
way: every example is counted exactly once over all hosts.

The state of a pipeline is the number of batches it has produced (plus what
identifies the stream, checked on restore); restoring rebuilds the grain
iterator from that batch on, which works with or without worker processes.

Packing (``data_config.packing``, training pipelines of causal_lm datasets):
the same global stream of examples, each trimmed of its trailing padding, is
packed in stream order into global batches of ``global_batch_size`` rows of
``packing_row_length`` tokens (first-fit, ``effformer.data.packing``); a
batch ends when the next example fits in none of its rows, and that example
starts the next one. Host p takes rows p, p + P, ... of every global batch.
Where a batch ends depends on every earlier example, so each host reads the
whole global stream (and keeps its rows). The state adds ``next_example``,
the stream position where the next batch starts: restoring rebuilds the grain
iterator from there, so a resumed run sees exactly the batches of an
uninterrupted one. Eval pipelines are never packed (one example per row, as
per-example metrics need).

Teacher store (``data_config.teacher_store``, training pipelines only): each
example of the stream also gets the teacher's stored top-K probabilities,
``teacher_topk_values`` float32 [K] and ``teacher_topk_indices`` int32 [K], read
by stream position from a store that ``effformer save-teacher-logits`` wrote for
this very stream (TinyViT's sparse distillation, ``effformer.data.teacher_store``).
The store is checked against the stream when the pipeline is built, and its
digest joins the state's identity.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import ml_collections
import numpy as np

from effformer.data.config import validate_data_config
from effformer.data.packing import BatchPacker, trim_padding
from effformer.data.preprocess import EvalExample, ExampleTransform
from effformer.data.registry import DatasetInfo, dataset_info, get_dataset_spec, load_builder

# In-process prefetch: a few batches ahead on a few threads, enough to hide
# record reads without holding hundreds of batches in memory.
_READ_THREADS = 2
_PREFETCH_BATCHES = 4
# 2: the shuffle seed is derived from the run's seed (shuffle_seed), a different stream.
_STATE_VERSION = 2
# State keys that say where in the stream a pipeline is (the rest identify the stream).
_POSITION_KEYS = ("next_batch", "next_example")


def shuffle_seed(seed: int) -> int:
    """The seed of the training stream's shuffle for a run's ``seed``.

    grain shuffles epoch ``e`` with ``seed + e``, so shuffling with the run's seed
    itself would give seeds s and s + 1 the same orders one epoch apart (runs meant
    to be independent would see the same stream, shifted). A hash of the seed keeps
    the runs' epoch seeds apart.
    """
    return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1)[0])


class InputPipeline:
    """Iterator of per-host batches: ``{"inputs", "label", "mask"}`` numpy arrays.

    ``inputs`` float32 [b, *info.input_shape], ``label`` int32 [b], ``mask`` bool [b],
    b = global_batch_size // process_count. ``num_batches`` is the number of
    batches of an eval pass, None for an endless train pipeline. With worker
    processes, call ``close()`` (or use ``with``) when done.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        info: DatasetInfo,
        *,
        identity: dict[str, Any],
        num_workers: int,
        num_batches: int | None,
    ):
        self.info = info
        self.num_batches = num_batches
        self._batches = batches
        self._identity = identity
        self._num_workers = num_workers
        self._next_batch = 0
        self._iterator = self._read(batches)

    def _read(self, dataset: grain.MapDataset) -> Any:
        """An iterator over ``dataset`` with prefetching (and workers, if any)."""
        dataset = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
        )
        if self._num_workers > 0:
            from absl import flags

            # grain's workers read absl flags; outside an absl app (notebooks,
            # tests) they are unparsed, so take their defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self._num_workers)
            )
        return iter(dataset)

    def __iter__(self) -> InputPipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        if self._num_workers > 0:
            # Plain copies, so grain's shared-memory buffers are released now
            # rather than by finalizers at interpreter exit.
            batch = {key: np.array(value) for key, value in batch.items()}
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch index and the stream's identity."""
        return {"version": _STATE_VERSION, "next_batch": self._next_batch, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from ``state`` (of a pipeline over the same stream).

        Raises:
          ValueError: ``state`` is from a different stream (dataset, split, seed,
            global batch size, train/eval or packing); the differing key is named.
        """
        next_batch = self._check_state(state)
        self._iterator.close()
        self._iterator = self._read(self._batches[next_batch:])
        self._next_batch = next_batch

    def _check_state(self, state: dict[str, Any]) -> int:
        """Checks ``state`` belongs to this stream; returns its ``next_batch``."""
        expected = {"version": _STATE_VERSION, **self._identity}
        # A key only one side has (e.g. "packing") also marks another stream.
        for key in sorted((set(expected) | set(state)) - set(_POSITION_KEYS)):
            if state.get(key) != expected.get(key):
                raise ValueError(
                    f"set_state: state[{key!r}] is {state.get(key)!r} but this pipeline "
                    f"has {expected.get(key)!r}; the state belongs to a different input stream."
                )
        next_batch = _state_int(state, "next_batch")
        if self.num_batches is not None and next_batch > self.num_batches:
            raise ValueError(
                f"set_state: state['next_batch'] is {next_batch}, beyond this pass's "
                f"{self.num_batches} batches."
            )
        return next_batch

    def close(self) -> None:
        """Stops prefetching (and worker processes, if any)."""
        self._iterator.close()

    def __enter__(self) -> InputPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _state_int(state: dict[str, Any], key: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"set_state: state[{key!r}] must be an int >= 0, got {value!r}.")
    return value


class PackedInputPipeline(InputPipeline):
    """Training batches of packed rows (``data_config.packing``; see the module docstring).

    Per-host batch: every 1-D feature of the records (``inputs``, ``targets``,
    ``weights``) and ``segment_ids``, ``positions`` as ``[b, row_length]``
    (``effformer.data.packing``'s layout: weights are the records' own, 0 on
    padding); ``mask [b]`` bool: the row holds at least one example. The
    records' 0-D features (``length``, ``prompt_length``) are dropped.
    """

    def __init__(
        self,
        examples: grain.MapDataset,
        info: DatasetInfo,
        *,
        identity: dict[str, Any],
        num_workers: int,
        row_length: int,
        global_rows: int,
        process_index: int,
        process_count: int,
    ):
        self._examples = examples
        self._packer = BatchPacker(row_length, global_rows)
        self._host_rows = slice(process_index, None, process_count)
        self._next_example = 0  # Stream position of the next batch's first example.
        self._held: dict[str, np.ndarray] | None = None  # That example, once read.
        super().__init__(
            examples, info, identity=identity, num_workers=num_workers, num_batches=None
        )

    def _place(self, example: dict[str, np.ndarray], position: int) -> bool:
        length = len(next(iter(example.values())))
        if length > self._packer.row_length:
            raise ValueError(
                f"data config field 'packing_row_length': the example at stream position "
                f"{position} has {length} tokens, more than the row length "
                f"{self._packer.row_length}; set a packing_row_length of at least the longest "
                "example (None: the dataset's row length always fits)."
            )
        return self._packer.add(example)

    def __next__(self) -> dict[str, np.ndarray]:
        consumed = 0
        if self._held is not None:
            self._place(self._held, self._next_example)
            self._held, consumed = None, 1
        while True:
            example = trim_padding(next(self._iterator))
            if not self._place(example, self._next_example + consumed):
                self._held = example  # It starts the next batch.
                break
            consumed += 1
        packed = self._packer.pop()
        self._next_example += consumed
        self._next_batch += 1
        batch = {key: value[self._host_rows] for key, value in packed.items()}
        batch["mask"] = (batch["segment_ids"] != 0).any(axis=1)
        return batch

    def get_state(self) -> dict[str, Any]:
        """The base state plus ``next_example``, where the next batch starts in the stream."""
        return {**super().get_state(), "next_example": self._next_example}

    def set_state(self, state: dict[str, Any]) -> None:
        next_batch = self._check_state(state)
        next_example = _state_int(state, "next_example")
        self._iterator.close()
        self._iterator = self._read(self._examples[next_example:])
        self._next_batch, self._next_example, self._held = next_batch, next_example, None


def _open_teacher_store(config: dict[str, Any], info: DatasetInfo, split: str, seed: int) -> Any:
    """The store of ``config["teacher_store"]``, checked against this training stream."""
    from effformer.data.teacher_store import open_teacher_store, stream_description

    store = open_teacher_store(config["teacher_store"])
    expected = stream_description(
        config,
        split=split,
        num_examples=info.splits[split],
        num_classes=info.num_classes,
        seed=seed,
    )
    store.check_stream(expected)
    return store


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}.")


def create_input_pipeline(
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    global_batch_size: int,
    train: bool,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> InputPipeline:
    """The pipeline of ``split`` for this host (see the module docstring).

    Args:
      data_config: fields of ``default_data_config``.
      split: a split of the dataset (``info.splits``).
      global_batch_size: examples per step over all hosts; divisible by process_count.
      train: shuffled, endless and augmented if True; one ordered, padded pass if False.
      seed: in [0, 2**32): order and augmentation.
      process_index, process_count: this host and the number of hosts (default:
        ``jax.process_index()`` and ``jax.process_count()``).
    """
    config = validate_data_config(data_config)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    _check_int("process_count", process_count, 1)
    _check_int("process_index", process_index, 0)
    if process_index >= process_count:
        raise ValueError(
            f"process_index: expected a value in [0, {process_count}), got {process_index}."
        )
    _check_int("global_batch_size", global_batch_size, 1)
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size: expected a multiple of process_count={process_count}, "
            f"got {global_batch_size}."
        )
    _check_int("seed", seed, 0)
    if seed >= 2**32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed}.")

    spec = get_dataset_spec(config["name"])
    builder = load_builder(spec, config["data_dir"])
    info = dataset_info(spec, builder, config["image_size"])
    if split not in info.splits:
        raise ValueError(
            f"split: expected one of {sorted(info.splits)} for {spec.name!r}, got {split!r}."
        )
    source = builder.as_data_source(split)
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError(f"split: {spec.name!r} split {split!r} has no examples.")

    generated = spec.generated  # Token datasets: records are already model examples.
    if generated is not None:
        transform = generated.example_transform()
    else:
        transform = ExampleTransform(spec, config, train=train, seed=int(seed))
    if train:
        # map_with_index after repeat: the index is the position in the global stream.
        examples = grain.MapDataset.source(source).shuffle(seed=shuffle_seed(seed)).repeat()
        examples = examples.map_with_index(transform)
        if config["teacher_store"]:
            store = _open_teacher_store(config, info, split, seed)
            examples = examples.map_with_index(store.attach)
        num_batches = None
    else:
        num_batches = math.ceil(num_examples / global_batch_size)
        examples = grain.MapDataset.range(num_batches * global_batch_size)
        if generated is not None:
            examples = examples.map(generated.eval_example(source))
        else:
            examples = examples.map(EvalExample(source, transform, info.input_shape))
    identity = {
        "dataset": spec.name,
        "split": split,
        "train": bool(train),
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
    }
    if config["teacher_store"] and train:
        identity["teacher_store"] = store.digest
    if config["packing"] and train:
        row_length = config["packing_row_length"] or info.input_shape[0]
        identity.update(packing=True, packing_row_length=int(row_length))
        return PackedInputPipeline(
            examples,
            info,
            identity=identity,
            num_workers=config["num_workers"],
            row_length=int(row_length),
            global_rows=global_batch_size,
            process_index=process_index,
            process_count=process_count,
        )
    host_batch_size = global_batch_size // process_count
    batches = examples[process_index::process_count].batch(host_batch_size, drop_remainder=True)
    return InputPipeline(
        batches, info, identity=identity, num_workers=config["num_workers"], num_batches=num_batches
    )
