"""A synthetic "speech-like" transduction task: frames in, the token sequence out.

What a CIF predictor must learn from speech, without speech: how many tokens an
utterance holds and where their boundaries are. An utterance is a random token
sequence (``lengths``, default 3-12 tokens over ``num_tokens`` = 12 symbols; no
token repeats its neighbour, since two equal neighbours would blur into one
segment of unknowable length); each token lasts a random number of frames
(``frames_per_token``, default 2-6) of its fixed random prototype vector
(``feature_dim`` = 16 channels, unit RMS, the same for every example of a
dataset); the clean frames are smoothed across time with ``smoothing``
(default ``(0.25, 0.5, 0.25)``, so boundaries blur as in speech) and Gaussian
noise of standard deviation ``noise_std`` (default 0.6) is added.

The frames do not fit the token-task interface of ``base.py`` (its prompts are
symbols), so this module serves the generated-dataset interface of the data
registry itself (``info``, ``as_data_source``, ``example_transform``,
``eval_example``, as ``digits_pixels`` does) and reuses ``base.py``'s
vocabulary and record helpers. Records:

* ``inputs`` float32 [T, F]: the frames, zero after the last real one
  (T = ``max(lengths) * max(frames_per_token)``);
* ``frame_mask`` bool [T]: True on real frames;
* ``targets`` int32 [N]: the token ids followed by ``<eos>`` (id 2), zero-padded
  (N = ``max(lengths) + 1``), the ``seq2seq`` layout, so the encoder-decoder
  baseline reads it with the ``seq2seq`` task; Paraformer's CIF predicts the
  ``<eos>`` too (FunASR's ``predictor_bias = 1``);
* ``weights`` float32 [N]: 1 on the targets; ``length`` int32 (tokens without
  ``<eos>``); ``num_frames`` int32;
* only with ``token_end_frames=True``: ``token_ends`` int32 [N], the frame after
  each target token's last frame (its end, exclusive; ``num_frames`` for
  ``<eos>``, 0 on padding): the weak alignment CarelessWhisper's training reads.
  The dataset ``speech_like_aligned`` is ``speech_like`` with this field (the
  same utterances).

Token ids: 0 ``<pad>``, 1 ``<sep>`` (unused), 2 ``<eos>``, then ``t0``, ``t1``, ...
Example ``i`` of split ``s`` comes from ``numpy.random.default_rng([seed, s, i])``
and the prototypes from ``default_rng([seed, 1000])``: deterministic, random
access, nothing stored. Splits: ``train`` and ``test`` (held out: other draws
of the same distribution). Registered as ``speech_like``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from effformer.data.registry import DatasetInfo, DatasetSpec, register_dataset
from effformer.data.tasks.base import (
    EOS,
    AddMask,
    PaddedEvalExample,
    Vocabulary,
    check_int,
    check_length_range,
)

SPLITS = ("train", "test")
NAME = "speech_like"


class SpeechLikeFrames:
    """The dataset of the module docstring.

    Args:
      name: the dataset name.
      num_tokens: the number of distinct symbols (>= 2).
      lengths: inclusive (low, high) range of tokens per utterance.
      frames_per_token: inclusive (low, high) range of frames per token.
      feature_dim: F, channels per frame.
      noise_std: standard deviation of the added Gaussian noise (>= 0).
      smoothing: weights over time (odd length, or () for none): clean frame t becomes
        ``sum_k smoothing[k] * clean[t + k - len(smoothing) // 2]`` (a correlation; the
        same as a convolution for the symmetric default), edge frames repeated outward.
      seed: the seed everything derives from.
      num_examples: examples per split, ``{"train": ..., "test": ...}``.
      token_end_frames: add the ``token_ends`` field to the records.
    """

    def __init__(
        self,
        *,
        name: str = NAME,
        num_tokens: int = 12,
        lengths: tuple[int, int] = (3, 12),
        frames_per_token: tuple[int, int] = (2, 6),
        feature_dim: int = 16,
        noise_std: float = 0.6,
        smoothing: tuple[float, ...] = (0.25, 0.5, 0.25),
        seed: int = 0,
        num_examples: dict[str, int] | None = None,
        token_end_frames: bool = False,
    ):
        self.name = name
        self.num_tokens = check_int(f"{name}: num_tokens", num_tokens, 2)
        self.lengths = check_length_range(f"{name}: lengths", lengths)
        self.frames_per_token = check_length_range(f"{name}: frames_per_token", frames_per_token)
        self.feature_dim = check_int(f"{name}: feature_dim", feature_dim, 1)
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
            raise ValueError(f"{name}: noise_std: expected a number >= 0, got {noise_std!r}.")
        self.noise_std = float(noise_std)
        self.smoothing = np.asarray(smoothing, np.float64)
        if self.smoothing.ndim != 1 or (self.smoothing.size and self.smoothing.size % 2 == 0):
            raise ValueError(
                f"{name}: smoothing: expected a 1-D kernel of odd length or (), got {smoothing!r}."
            )
        self.seed = check_int(f"{name}: seed", seed, 0)
        num_examples = dict(num_examples or {"train": 20000, "test": 512})
        if set(num_examples) != set(SPLITS):
            raise ValueError(
                f"{name}: num_examples must have the splits {SPLITS}, got {sorted(num_examples)}."
            )
        for split, count in num_examples.items():
            check_int(f"{name}: num_examples[{split!r}]", count, 1)
        self.num_examples = num_examples
        self.token_end_frames = bool(token_end_frames)
        self.vocabulary = Vocabulary([f"t{i}" for i in range(self.num_tokens)])
        self.eos_id = self.vocabulary.encode([EOS])[0]
        self.first_token_id = len(self.vocabulary) - self.num_tokens
        self.max_frames = self.lengths[1] * self.frames_per_token[1]
        self.max_targets = self.lengths[1] + 1

    @functools.cached_property
    def prototypes(self) -> np.ndarray:
        """[num_tokens, F] float64, unit RMS per token."""
        rng = np.random.default_rng([self.seed, 1000])
        prototypes = rng.normal(size=(self.num_tokens, self.feature_dim))
        return prototypes / np.sqrt(np.mean(prototypes**2, axis=1, keepdims=True))

    @functools.cached_property
    def info(self) -> DatasetInfo:
        return DatasetInfo(
            name=self.name,
            task="seq2seq",
            num_classes=len(self.vocabulary),
            input_shape=(self.max_frames, self.feature_dim),
            splits=dict(self.num_examples),
            train_split="train",
            eval_split="test",
            vocab_size=len(self.vocabulary),
        )

    # ------------------------------------------------------------------ examples
    def utterance(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token indices [L] in 0..num_tokens-1, frames per token [L], frames [sum, F] float64)."""
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {split!r}.")
        if not 0 <= index < self.num_examples[split]:
            raise IndexError(
                f"{self.name}: index {index} out of range for split {split!r} "
                f"({self.num_examples[split]} examples)."
            )
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        length = int(rng.integers(self.lengths[0], self.lengths[1] + 1))
        tokens = [int(rng.integers(self.num_tokens))]
        for _ in range(length - 1):  # a uniform token other than the previous one
            step = int(rng.integers(1, self.num_tokens))
            tokens.append((tokens[-1] + step) % self.num_tokens)
        tokens = np.asarray(tokens)
        low, high = self.frames_per_token
        durations = rng.integers(low, high + 1, size=length)
        clean = np.repeat(self.prototypes[tokens], durations, axis=0)
        # Any kernel, one tap included ((2.0,) doubles the frames; skipping size 1 ignored it).
        if self.smoothing.size:  # edge frames repeat outward, so the ends keep their level
            pad = self.smoothing.size // 2
            padded = np.pad(clean, ((pad, pad), (0, 0)), mode="edge")
            clean = sum(
                weight * padded[offset : offset + len(clean)]
                for offset, weight in enumerate(self.smoothing)
            )
        frames = clean + self.noise_std * rng.normal(size=clean.shape)
        return tokens, durations, frames

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """The record of example ``index`` of ``split`` (module docstring)."""
        tokens, durations, frames = self.utterance(split, index)
        return self._record(tokens, frames, durations)

    def _record(
        self, tokens: np.ndarray, frames: np.ndarray, durations: np.ndarray
    ) -> dict[str, np.ndarray]:
        inputs = np.zeros((self.max_frames, self.feature_dim), np.float32)
        inputs[: len(frames)] = frames
        frame_mask = np.arange(self.max_frames) < len(frames)
        targets = np.zeros(self.max_targets, np.int32)
        ids = list(tokens + self.first_token_id) + [self.eos_id]
        targets[: len(ids)] = ids
        record = {
            "inputs": inputs,
            "frame_mask": frame_mask,
            "targets": targets,
            "weights": (targets != 0).astype(np.float32),
            "length": np.int32(len(tokens)),
            "num_frames": np.int32(len(frames)),
        }
        if self.token_end_frames:
            ends = np.zeros(self.max_targets, np.int32)
            ends[: len(tokens)] = np.cumsum(durations)
            ends[len(tokens)] = len(frames)
            record["token_ends"] = ends
        return record

    def empty_example(self) -> dict[str, np.ndarray]:
        """An all-padding record (no frames, no targets) for padding eval batches."""
        template = self._record(
            np.zeros(0, np.int64), np.zeros((0, self.feature_dim)), np.zeros(0, np.int64)
        )
        return {key: np.zeros_like(value) for key, value in template.items()}

    # ----------------------------------------------------- the registry's interface
    def as_data_source(self, split: str) -> SpeechLikeSource:
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {split!r}.")
        return SpeechLikeSource(self, split)

    def example_transform(self) -> AddMask:
        return AddMask()

    def eval_example(self, source: SpeechLikeSource) -> PaddedEvalExample:
        return PaddedEvalExample(source, self.empty_example())


@dataclasses.dataclass(frozen=True)
class SpeechLikeSource:
    """grain random-access source over one split (picklable for grain workers)."""

    dataset: SpeechLikeFrames
    split: str

    def __len__(self) -> int:
        return self.dataset.num_examples[self.split]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.dataset.example(self.split, int(index))


def register_speech_like(dataset: SpeechLikeFrames) -> SpeechLikeFrames:
    """Registers ``dataset`` under its name (tests register small ones)."""
    register_dataset(
        DatasetSpec(
            name=dataset.name,
            tfds_name=dataset.name,
            task="seq2seq",
            num_classes=len(dataset.vocabulary),
            input_key="inputs",
            label_key="targets",
            native_shape=dataset.info.input_shape,
            channels=dataset.feature_dim,
            max_value=None,
            mean=(0.0,),
            std=(1.0,),
            train_split="train",
            eval_split="test",
            generated=dataset,
        )
    )
    return dataset


DATASET = register_speech_like(SpeechLikeFrames())
ALIGNED_DATASET = register_speech_like(
    SpeechLikeFrames(name="speech_like_aligned", token_end_frames=True)
)
