"""TinyViT's sparse teacher store: top-K teacher probabilities per example of the training stream.

TinyViT (Wu et al., ECCV 2022) runs the teacher ONCE over the augmented
training stream and keeps, per image and epoch, the augmentation's random seed
and the teacher's K largest softmax probabilities (values and class indices;
K = 100 at ImageNet scale). The student's training then replays the same
augmentation from the stored seed, so each stored label belongs to exactly the
image the student sees, and rebuilds a label distribution from the sparse
store: the K stored probabilities at their classes and the remaining mass
``1 - sum(values)`` spread evenly over the other ``C - K`` classes (the
official ``train_one_epoch_distill_using_saved_logits``).

Here the augmentation of the example at position ``p`` of the training stream
is already fixed by ``(pipeline seed, p)`` (``effformer.data.preprocess``), and
so is its record (grain's per-epoch shuffle of the split, seeded with
``shuffle_seed(seed) + epoch``, ``effformer.data.pipeline``). Replay is therefore the same pipeline config: the store is keyed
by stream position, row ``p - e * N`` of epoch ``e``'s shard (``N`` examples per
epoch), and holds the pipeline seed once, in its manifest, rather than a seed
per image. Whatever batch size or number of hosts the student uses, position
``p`` is the same image.

Layout of a store directory::

    manifest.json        what the store was saved for (below); written last
    epoch_00000.npy ...  one shard per epoch: N rows, in stream order

A shard is a numpy structured array (``np.load(..., mmap_mode="r")`` reads rows
without loading the file) with fields ``record`` (int32: the example's index in
the split, its stable key with the epoch), ``fingerprint`` (uint32: CRC-32 of the
augmented input's float32 bytes and the int32 label, see :func:`fingerprint`),
``indices`` ([K] int16, int32 above 32,767 classes) and ``values`` ([K] float16 as
the official code stores them, or float32), sorted by decreasing probability.

The manifest holds the stream (dataset, split, examples per epoch, class count,
pipeline seed and every field of the data config that changes the images:
``image_size`` and the augmentation), its SHA-256 (``stream_hash``), ``epochs``,
``top_k``, the dtypes, the teacher (workdir, step, model) and each shard's file
name, row count and SHA-256.

Reading refuses, with the field named: a store saved for another stream (a
mismatch would pair labels with the wrong images), a missing or truncated shard
or one of another layout (when the store is opened), a shard whose SHA-256
differs from the manifest's (when a process first reads from it: one
sequential read per epoch, not all epochs at start), and a replayed example
whose fingerprint differs from the one the teacher saw: another record at that
position (grain's shuffle changed) or other pixels (the preprocessing or its
libraries changed). The ``record`` column is the example's key for people and
tools; the fingerprint is what is checked, since recomputing each position's
record would cost another shuffle per example. Reading past the stored
epochs fails too; ``effformer.train.teacher_logits.check_teacher_store``
refuses such a run before its first step.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "effformer-teacher-topk"
VERSION = 1
MANIFEST = "manifest.json"
VALUES_DTYPES = ("float16", "float32")
# Data config fields that change the images of the training stream.
STREAM_DATA_FIELDS = (
    "image_size",
    "crop_padding",
    "flip",
    "randaugment_num_layers",
    "randaugment_magnitude",
    "random_erasing",
)
# Keys the pipeline adds to each training example.
VALUES_KEY = "teacher_topk_values"
INDICES_KEY = "teacher_topk_indices"


class TeacherStoreError(ValueError):
    """A teacher store that cannot serve this run: missing, corrupt, or of another stream."""


def stream_description(
    data_config: dict[str, Any],
    *,
    split: str,
    num_examples: int,
    num_classes: int,
    seed: int,
) -> dict[str, Any]:
    """What identifies a training stream's images: JSON-serialisable, compared field by field.

    ``data_config`` is a validated data config (``validate_data_config``); ``split``
    the training split, ``num_examples`` its size N, ``seed`` the pipeline seed.
    """
    description = {
        "dataset": data_config["name"],
        "split": split,
        "num_examples": int(num_examples),
        "num_classes": int(num_classes),
        "seed": int(seed),
    }
    description.update({field: data_config[field] for field in STREAM_DATA_FIELDS})
    return description


def stream_hash(description: dict[str, Any]) -> str:
    """SHA-256 of the description's canonical JSON."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def fingerprint(inputs: np.ndarray, label: Any) -> int:
    """CRC-32 of one example's float32 input bytes followed by its int32 label."""
    data = np.ascontiguousarray(inputs, dtype=np.float32).tobytes()
    return zlib.crc32(np.int32(label).tobytes(), zlib.crc32(data))


def stream_records(num_examples: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """The split index of the record at each training-stream position (int32)."""
    import grain

    from effformer.data.pipeline import shuffle_seed

    order = grain.MapDataset.range(num_examples).shuffle(seed=shuffle_seed(seed)).repeat()
    return np.asarray([order[int(p)] for p in positions], np.int32)


def indices_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def shard_dtype(top_k: int, values_dtype: str, index_dtype: str) -> np.dtype:
    """The row layout of a shard."""
    return np.dtype(
        [
            ("record", "<i4"),
            ("fingerprint", "<u4"),
            ("indices", np.dtype(index_dtype).newbyteorder("<"), (top_k,)),
            ("values", np.dtype(values_dtype).newbyteorder("<"), (top_k,)),
        ]
    )


def shard_name(epoch: int) -> str:
    return f"epoch_{epoch:05d}.npy"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}.")


class TeacherStoreWriter:
    """Writes a store from consecutive batches of the training stream, position 0 on.

    ``add(fingerprints [b], values [b, K], indices [b, K])`` takes the next b
    positions (rows past the last epoch are dropped); each epoch's shard is written
    (to a temporary name, then renamed) as soon as it is full. ``finish()`` writes
    the manifest once every epoch is on disk: a directory without a manifest is
    not a store.
    """

    def __init__(
        self,
        directory: str | Path,
        stream: dict[str, Any],
        *,
        top_k: int,
        epochs: int,
        values_dtype: str = "float16",
        teacher: dict[str, Any] | None = None,
    ):
        _check_positive_int("top_k", top_k)
        _check_positive_int("epochs", epochs)
        num_classes = stream["num_classes"]
        if top_k > num_classes:
            raise ValueError(f"top_k: expected at most num_classes={num_classes}, got {top_k}.")
        if values_dtype not in VALUES_DTYPES:
            raise ValueError(
                f"values_dtype: expected one of {VALUES_DTYPES}, got {values_dtype!r}."
            )
        self.directory = Path(directory)
        if (self.directory / MANIFEST).exists():
            raise FileExistsError(
                f"out: {str(self.directory)!r} already holds a teacher store ({MANIFEST}); "
                "choose another directory or delete it."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stream = dict(stream)
        self.top_k, self.epochs = int(top_k), int(epochs)
        self.num_examples = int(stream["num_examples"])
        self.values_dtype = values_dtype
        self.index_dtype = indices_dtype(num_classes)
        self.dtype = shard_dtype(self.top_k, values_dtype, self.index_dtype)
        self.teacher = teacher or {}
        self.shards: list[dict[str, Any]] = []
        self._rows = np.zeros(self.num_examples, self.dtype)
        self._filled = 0  # Rows of the current epoch written so far.

    @property
    def num_positions(self) -> int:
        return self.epochs * self.num_examples

    @property
    def done(self) -> bool:
        return len(self.shards) == self.epochs

    def add(self, fingerprints: np.ndarray, values: np.ndarray, indices: np.ndarray) -> None:
        """Rows for the next ``len(fingerprints)`` stream positions."""
        count = len(fingerprints)
        if np.shape(values) != (count, self.top_k) or np.shape(indices) != (count, self.top_k):
            raise ValueError(
                f"add: expected values and indices of shape [{count}, {self.top_k}], got "
                f"{np.shape(values)} and {np.shape(indices)}."
            )
        start = 0
        while start < count and not self.done:
            take = min(count - start, self.num_examples - self._filled)
            rows = self._rows[self._filled : self._filled + take]
            rows["fingerprint"] = fingerprints[start : start + take]
            rows["values"] = values[start : start + take]
            rows["indices"] = indices[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.num_examples:
                self._write_shard()

    def _write_shard(self) -> None:
        epoch = len(self.shards)
        positions = epoch * self.num_examples + np.arange(self.num_examples)
        self._rows["record"] = stream_records(self.num_examples, self.stream["seed"], positions)
        name = shard_name(epoch)
        path = self.directory / name
        temporary = path.with_name(name + ".tmp")
        with open(temporary, "wb") as file:
            np.lib.format.write_array(file, self._rows, allow_pickle=False)
        temporary.replace(path)
        self.shards.append(
            {"file": name, "epoch": epoch, "rows": self.num_examples, "sha256": _sha256(path)}
        )
        self._filled = 0

    def finish(self) -> dict[str, Any]:
        """Writes the manifest; returns it."""
        if not self.done:
            raise RuntimeError(
                f"finish: {len(self.shards)} of {self.epochs} epochs written; add the rest first."
            )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "stream": self.stream,
            "stream_hash": stream_hash(self.stream),
            "epochs": self.epochs,
            "top_k": self.top_k,
            "values_dtype": self.values_dtype,
            "indices_dtype": self.index_dtype,
            "teacher": self.teacher,
            "shards": self.shards,
        }
        path = self.directory / MANIFEST
        temporary = path.with_name(MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        temporary.replace(path)
        return manifest


def _read_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of a .npy file."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
        return dtype, shape, file.tell()


class TeacherStore:
    """A store opened for reading (:func:`open_teacher_store`); see the module docstring.

    Picklable (grain worker processes): each process maps and verifies the
    shards it reads itself. ``attach(position, example)`` is the pipeline's
    ``map_with_index`` function.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest
        self.stream = manifest["stream"]
        self.epochs = int(manifest["epochs"])
        self.top_k = int(manifest["top_k"])
        self.num_examples = int(self.stream["num_examples"])
        self.num_classes = int(self.stream["num_classes"])
        self.dtype = shard_dtype(self.top_k, manifest["values_dtype"], manifest["indices_dtype"])
        # Identifies this store's content (for the pipeline state's identity).
        canonical = json.dumps(manifest, sort_keys=True).encode()
        self.digest = hashlib.sha256(canonical).hexdigest()[:16]
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._shards: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_lock", "_shards"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    @property
    def num_positions(self) -> int:
        """Training-stream positions the store covers: epochs * N."""
        return self.epochs * self.num_examples

    def check_stream(self, expected: dict[str, Any]) -> None:
        """Refuses a store saved for another stream (``expected``: :func:`stream_description`)."""
        for key in sorted(set(expected) | set(self.stream)):
            saved, wanted = self.stream.get(key), expected.get(key)
            if saved != wanted:
                raise TeacherStoreError(
                    f"config.data.teacher_store={str(self.directory)!r} was saved for a "
                    f"training stream with {key}={saved!r}, but this run's stream has "
                    f"{key}={wanted!r}: its labels would be paired with other images. Save a "
                    "store for this run's config (effformer save-teacher-logits --config ...)."
                )

    def _shard_path(self, epoch: int) -> Path:
        return self.directory / self.manifest["shards"][epoch]["file"]

    def check_shard_files(self) -> None:
        """Every shard exists with the layout and size the manifest gives (headers only)."""
        for epoch in range(self.epochs):
            path = self._shard_path(epoch)
            if not path.is_file():
                raise TeacherStoreError(
                    f"teacher store {str(self.directory)!r}: shard {path.name} (epoch {epoch}) "
                    "is missing."
                )
            try:
                dtype, shape, offset = _read_header(path)
            except (ValueError, OSError, SyntaxError) as error:
                raise TeacherStoreError(
                    f"teacher store {str(self.directory)!r}: shard {path.name} (epoch {epoch}) "
                    f"is corrupt: its header does not read ({error})."
                ) from None
            if dtype != self.dtype or shape != (self.num_examples,):
                raise TeacherStoreError(
                    f"teacher store {str(self.directory)!r}: shard {path.name} (epoch {epoch}) "
                    f"holds {shape} rows of {dtype}; the manifest expects ({self.num_examples},) "
                    f"rows of {self.dtype}."
                )
            size = offset + self.num_examples * self.dtype.itemsize
            if path.stat().st_size != size:
                raise TeacherStoreError(
                    f"teacher store {str(self.directory)!r}: shard {path.name} (epoch {epoch}) "
                    f"is corrupt: {path.stat().st_size} bytes, expected {size} (truncated?)."
                )

    def shard(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s rows (memory-mapped); its SHA-256 is checked on first use."""
        shard = self._shards.get(epoch)
        if shard is not None:
            return shard
        with self._lock:
            if epoch not in self._shards:
                path = self._shard_path(epoch)
                if not path.is_file():
                    raise TeacherStoreError(
                        f"teacher store {str(self.directory)!r}: shard {path.name} (epoch "
                        f"{epoch}) is missing."
                    )
                expected = self.manifest["shards"][epoch]["sha256"]
                actual = _sha256(path)
                if actual != expected:
                    raise TeacherStoreError(
                        f"teacher store {str(self.directory)!r}: shard {path.name} (epoch "
                        f"{epoch}) is corrupt: SHA-256 {actual[:16]}..., the manifest has "
                        f"{expected[:16]}.... Save the store again."
                    )
                self._shards[epoch] = np.load(path, mmap_mode="r", allow_pickle=False)
            return self._shards[epoch]

    def row(self, position: int) -> np.void:
        """The stored row of a training-stream position."""
        epoch, index = divmod(int(position), self.num_examples)
        if not 0 <= epoch < self.epochs:
            raise TeacherStoreError(
                f"teacher store {str(self.directory)!r} holds {self.epochs} epochs of the "
                f"training stream ({self.num_positions} examples); stream position {position} "
                f"is in epoch {epoch}. Save more epochs or train fewer steps."
            )
        return self.shard(epoch)[index]

    def attach(self, position: int, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds ``teacher_topk_values`` (float32 [K]) and ``teacher_topk_indices`` (int32 [K]).

        Raises TeacherStoreError if the example's fingerprint differs from the one
        the teacher saw at this position.
        """
        row = self.row(position)
        if fingerprint(example["inputs"], example["label"]) != int(row["fingerprint"]):
            raise TeacherStoreError(
                f"teacher store {str(self.directory)!r}: the replayed example at stream position "
                f"{position} (epoch {position // self.num_examples}, stored record "
                f"{int(row['record'])}) differs from the one the teacher saw: another record "
                "(grain's shuffle changed) or other preprocessing (augmentation code or library "
                "versions changed). Save the store again with this software."
            )
        return {
            **example,
            VALUES_KEY: np.asarray(row["values"], np.float32),
            INDICES_KEY: np.asarray(row["indices"], np.int32),
        }


def open_teacher_store(directory: str | Path) -> TeacherStore:
    """Reads and checks a store's manifest and shard headers (not their content)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise TeacherStoreError(
            f"teacher store {str(directory)!r}: no {MANIFEST}, so not a (complete) teacher store; "
            "write one with `effformer save-teacher-logits`."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TeacherStoreError(
            f"teacher store {str(directory)!r}: {MANIFEST} is corrupt ({error})."
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise TeacherStoreError(
            f"teacher store {str(directory)!r}: {MANIFEST} has format "
            f"{manifest.get('format')!r} version {manifest.get('version')!r}; this reader "
            f"reads {FORMAT!r} version {VERSION}."
        )
    stream = manifest.get("stream", {})
    if manifest.get("stream_hash") != stream_hash(stream):
        raise TeacherStoreError(
            f"teacher store {str(directory)!r}: {MANIFEST} is corrupt: its stream description "
            "does not match its stream_hash (edited by hand?)."
        )
    shards = manifest.get("shards", [])
    epochs = manifest.get("epochs")
    if [shard.get("epoch") for shard in shards] != list(range(epochs or 0)) or not epochs:
        raise TeacherStoreError(
            f"teacher store {str(directory)!r}: {MANIFEST} lists shards for epochs "
            f"{[shard.get('epoch') for shard in shards]}, expected 0..{(epochs or 0) - 1}."
        )
    store = TeacherStore(directory, manifest)
    store.check_shard_files()
    return store


def rebuild_teacher_probs(values: jax.Array, indices: jax.Array, num_classes: int) -> jax.Array:
    """Dense teacher distributions [b, C] from top-K probabilities ``values`` [b, K] at ``indices``.

    The K stored probabilities at their classes, the remaining mass
    ``max(1 - sum(values), 0)`` spread evenly over the other ``C - K`` classes (as
    the official code does; nothing remains when K = C), then divided by the total.
    The division changes nothing unless float16 rounding of the stored values made
    them sum above 1; it makes every row sum to 1 exactly (up to float32 rounding).
    """
    values = jnp.asarray(values, jnp.float32)
    indices = jnp.asarray(indices, jnp.int32)
    if values.ndim != 2 or indices.shape != values.shape:
        raise ValueError(
            f"values, indices: expected matching shapes [b, K], got {values.shape} and "
            f"{indices.shape}."
        )
    batch, top_k = values.shape
    if top_k > num_classes:
        raise ValueError(f"values: expected K <= num_classes={num_classes}, got K={top_k}.")
    rest = jnp.maximum(1.0 - jnp.sum(values, axis=-1, keepdims=True), 0.0)
    others = num_classes - top_k
    minor = rest / others if others else jnp.zeros_like(rest)
    dense = jnp.broadcast_to(minor, (batch, num_classes))
    dense = dense.at[jnp.arange(batch)[:, None], indices].set(values)
    return dense / jnp.sum(dense, axis=-1, keepdims=True)


def epochs_to_cover(num_positions: int, num_examples: int) -> int:
    """Epochs of N examples that hold the first ``num_positions`` stream positions."""
    return max(1, math.ceil(num_positions / num_examples))
