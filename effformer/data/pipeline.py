"""Input pipelines: TFDS data sources read through grain, per-host batches.

Train pipelines form one global stream of examples: the split shuffled with
``seed`` (grain's index shuffle, a new permutation each epoch, seeded with
seed + epoch), repeated forever. The stream is cut into global batches of
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
"""

from __future__ import annotations

import math
from typing import Any

import grain
import ml_collections
import numpy as np

from effformer.data.config import validate_data_config
from effformer.data.preprocess import EvalExample, ExampleTransform
from effformer.data.registry import DatasetInfo, dataset_info, get_dataset_spec, load_builder

# In-process prefetch: a few batches ahead on a few threads, enough to hide
# record reads without holding hundreds of batches in memory.
_READ_THREADS = 2
_PREFETCH_BATCHES = 4
_STATE_VERSION = 1


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
        self._iterator = self._iterator_from(0)

    def _iterator_from(self, batch_index: int) -> Any:
        dataset = self._batches[batch_index:].to_iter_dataset(
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
            global batch size or train/eval); the differing key is named.
        """
        expected = {"version": _STATE_VERSION, **self._identity}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"set_state: state[{key!r}] is {state.get(key)!r} but this pipeline "
                    f"has {value!r}; the state belongs to a different input stream."
                )
        next_batch = state.get("next_batch")
        if isinstance(next_batch, bool) or not isinstance(next_batch, int) or next_batch < 0:
            raise ValueError(
                f"set_state: state['next_batch'] must be an int >= 0, got {next_batch!r}."
            )
        if self.num_batches is not None and next_batch > self.num_batches:
            raise ValueError(
                f"set_state: state['next_batch'] is {next_batch}, beyond this pass's "
                f"{self.num_batches} batches."
            )
        self._iterator.close()
        self._iterator = self._iterator_from(next_batch)
        self._next_batch = next_batch

    def close(self) -> None:
        """Stops prefetching (and worker processes, if any)."""
        self._iterator.close()

    def __enter__(self) -> InputPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
        examples = grain.MapDataset.source(source).shuffle(seed=int(seed)).repeat()
        examples = examples.map_with_index(transform)
        num_batches = None
    else:
        num_batches = math.ceil(num_examples / global_batch_size)
        examples = grain.MapDataset.range(num_batches * global_batch_size)
        if generated is not None:
            examples = examples.map(generated.eval_example(source))
        else:
            examples = examples.map(EvalExample(source, transform, info.input_shape))
    host_batch_size = global_batch_size // process_count
    batches = examples[process_index::process_count].batch(host_batch_size, drop_remainder=True)
    identity = {
        "dataset": spec.name,
        "split": split,
        "train": bool(train),
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
    }
    return InputPipeline(
        batches, info, identity=identity, num_workers=config["num_workers"], num_batches=num_batches
    )
