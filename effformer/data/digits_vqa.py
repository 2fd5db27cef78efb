"""Visual questions about scikit-learn's digits in SOLO's layout (dataset ``digits_vqa``).

Each record is one image of :mod:`effformer.data.embedded.digits` (same split:
1,437 train / 360 test images) and one question about it, laid out as SOLO
(``effformer.models.solo``) reads an image and a prompt:

    <vision> 4 rows of 4 <vpatch> (<vrow_sep> between rows) </vision> question answer <eos>

* Image: the 8x8 image (values 0..16, divided by 16) upscaled 2x by pixel
  repetition to 16x16, normalised with the digits train split's mean and std
  (SOLO normalises with ImageNet's), cut into 4x4 patches in raster order:
  ``patches`` float32 [16, 16] (16 patches of 4*4*1 values).
* Questions (:data:`QUESTION_TYPES`), over a word vocabulary (:data:`SYMBOLS`):

  - ``what_digit``: "what digit is this ?" -> the digit;
  - ``is_even``: "is it even ?" -> yes / no;
  - ``greater_than_4``: "is it greater than 4 ?" -> yes / no;
  - ``plus_k_mod_10``: "what is the digit plus k mod 10 ?" -> (digit + k) mod 10,
    k in 1..9 drawn per record from ``numpy.random.default_rng([split number, index])``.

  Every image appears once with each question: record ``i`` is image ``i // 4``
  with question ``i % 4`` (5,748 train / 1,440 test records), so each question has
  the split's balanced class counts (the test split: 36 images per digit).

Fields of a record (row length L = :data:`ROW_LENGTH` = 31, right-padded with 0):

* ``inputs`` int32 [L]: the sequence without its last token; ``targets`` int32 [L]:
  the next token;
* ``weights`` float32 [L]: 1 where the target is an answer token or ``<eos>``,
  0 on the image, the question and padding (SOLO's labels are -100 there);
* ``patch_indices`` int32 [L]: the patch of each ``<vpatch>`` input token, -1 elsewhere;
* ``patches`` float32 [16, 16];
* ``question_type`` int32 (index into :data:`QUESTION_TYPES`), ``label`` int32 (the
  digit), ``prompt_length`` int32 (tokens before the answer: the prompt for
  generation is ``inputs[:prompt_length]``).

The data come from ``sklearn.datasets.load_digits`` (bundled, no network), read
once per process; nothing is written to data_dir. Task: ``solo_vqa``
(``effformer.train.solo_task``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from effformer.data.registry import DatasetInfo, DatasetSpec, register_dataset
from effformer.data.tasks.base import AddMask, PaddedEvalExample

NAME = "digits_vqa"
SPLITS = ("train", "test")
PAD, EOS = "<pad>", "<eos>"
VISION_TOKENS = ("<vision>", "<vpatch>", "<vrow_sep>", "</vision>")
WORDS = ("what", "digit", "is", "this", "it", "even", "greater", "than", "the", "plus",
         "mod", "10", "?", "yes", "no")  # fmt: skip
DIGITS = tuple(str(d) for d in range(10))
SYMBOLS = (PAD, EOS, *VISION_TOKENS, *WORDS, *DIGITS)
TOKEN_IDS = {symbol: index for index, symbol in enumerate(SYMBOLS)}
VOCAB_SIZE = len(SYMBOLS)
PAD_ID, EOS_ID = TOKEN_IDS[PAD], TOKEN_IDS[EOS]

QUESTION_TYPES = ("what_digit", "is_even", "greater_than_4", "plus_k_mod_10")
IMAGE_SIZE = 16  # the 8x8 digits upscaled 2x
PATCH_SIZE = 4
NUM_CHANNELS = 1
GRID = IMAGE_SIZE // PATCH_SIZE  # 4 x 4 patches
NUM_PATCHES = GRID * GRID
PATCH_DIM = NUM_CHANNELS * PATCH_SIZE * PATCH_SIZE
# Mean and std of the digits train split's pixels / 16 (effformer.data.registry's "digits").
PIXEL_MEAN, PIXEL_STD = 0.30543300, 0.37609306
_IMAGE_TOKENS = NUM_PATCHES + GRID - 1 + 2
_LONGEST_QUESTION = 9  # "what is the digit plus k mod 10 ?"
ROW_LENGTH = _IMAGE_TOKENS + _LONGEST_QUESTION + 2 - 1  # + answer + <eos>, - the shift


@dataclasses.dataclass(frozen=True)
class VqaDatasetInfo(DatasetInfo):
    """``DatasetInfo`` plus what a SOLO task needs: the question names (for metrics per
    question) and the patches' shape (for the model)."""

    question_types: tuple[str, ...] = ()
    patch_size: int = 0
    num_channels: int = 0


def question_and_answer(question_type: int, digit: int, k: int) -> tuple[list[str], list[str]]:
    """(question words, answer words) of question ``question_type`` about ``digit``;
    ``k`` is the addend of ``plus_k_mod_10``."""
    name = QUESTION_TYPES[question_type]
    if name == "what_digit":
        return ["what", "digit", "is", "this", "?"], [str(digit)]
    if name == "is_even":
        return ["is", "it", "even", "?"], ["yes" if digit % 2 == 0 else "no"]
    if name == "greater_than_4":
        return ["is", "it", "greater", "than", "4", "?"], ["yes" if digit > 4 else "no"]
    question = ["what", "is", "the", "digit", "plus", str(k), "mod", "10", "?"]
    return question, [str((digit + k) % 10)]


def encode(symbols: list[str]) -> list[int]:
    return [TOKEN_IDS[symbol] for symbol in symbols]


def image_patches(pixels: np.ndarray) -> np.ndarray:
    """8x8 pixels (values 0..16) -> normalised patches float32 [NUM_PATCHES, PATCH_DIM]."""
    from effformer.models.solo import image_to_patches

    image = np.repeat(np.repeat(pixels.astype(np.float32) / 16.0, 2, axis=0), 2, axis=1)
    image = (image - PIXEL_MEAN) / PIXEL_STD
    return image_to_patches(image[..., None], PATCH_SIZE).reshape(NUM_PATCHES, PATCH_DIM)


class DigitsVqa:
    """The ``digits_vqa`` dataset (records as in the module docstring)."""

    name = NAME

    @functools.cached_property
    def _split_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (pixels uint8 [N, 8, 8], labels int32 [N])."""
        from sklearn.datasets import load_digits

        from effformer.data.embedded.digits import digits_split_indices

        digits = load_digits()
        return {
            split: (digits.images[rows].astype(np.uint8), digits.target[rows].astype(np.int32))
            for split, rows in digits_split_indices().items()
        }

    @functools.cached_property
    def _image_layout(self) -> tuple[np.ndarray, np.ndarray]:
        from effformer.models.solo import VisionTokenIds, image_token_layout

        ids = VisionTokenIds(*(TOKEN_IDS[token] for token in VISION_TOKENS))
        return image_token_layout(GRID, GRID, tokens=ids)

    @functools.cached_property
    def info(self) -> VqaDatasetInfo:
        return VqaDatasetInfo(
            name=NAME,
            task="solo_vqa",
            num_classes=VOCAB_SIZE,
            input_shape=(ROW_LENGTH,),
            splits={
                split: len(self._split_arrays[split][0]) * len(QUESTION_TYPES) for split in SPLITS
            },  # fmt: skip
            train_split="train",
            eval_split="test",
            vocab_size=VOCAB_SIZE,
            question_types=QUESTION_TYPES,
            patch_size=PATCH_SIZE,
            num_channels=NUM_CHANNELS,
        )

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Record ``index`` of ``split``: image ``index // 4``, question ``index % 4``."""
        if split not in SPLITS:
            raise ValueError(f"{NAME}: split must be one of {SPLITS}, got {split!r}.")
        pixels, labels = self._split_arrays[split]
        size = len(pixels) * len(QUESTION_TYPES)
        if not 0 <= index < size:
            raise IndexError(
                f"{NAME}: index {index} out of range for split {split!r} ({size} examples)."
            )
        image, question_type = divmod(int(index), len(QUESTION_TYPES))
        k = int(np.random.default_rng([SPLITS.index(split), index]).integers(1, 10))
        return self._record(pixels[image], int(labels[image]), question_type, k)

    def _record(
        self, pixels: np.ndarray, digit: int, question_type: int, k: int
    ) -> dict[str, np.ndarray]:
        image_ids, image_indices = self._image_layout
        question, answer = question_and_answer(question_type, digit, k)
        prompt = np.concatenate([image_ids, encode(question)])
        sequence = np.concatenate([prompt, encode(answer), [EOS_ID]]).astype(np.int32)
        patch_indices = np.concatenate([image_indices, np.full(len(sequence) - len(image_ids), -1)])
        used = len(sequence) - 1
        pad = ROW_LENGTH - used
        weights = np.zeros(ROW_LENGTH, np.float32)
        weights[len(prompt) - 1 : used] = 1.0  # targets: the answer and <eos>
        return {
            "inputs": np.pad(sequence[:-1], (0, pad)).astype(np.int32),
            "targets": np.pad(sequence[1:], (0, pad)).astype(np.int32),
            "weights": weights,
            "patch_indices": np.pad(patch_indices[:-1], (0, pad), constant_values=-1).astype(
                np.int32
            ),
            "patches": image_patches(pixels),
            "question_type": np.int32(question_type),
            "label": np.int32(digit),
            "prompt_length": np.int32(len(prompt)),
        }

    def empty_example(self) -> dict[str, np.ndarray]:
        """A record of zeros (weights 0, no patch) with the records' shapes, for padding eval
        batches."""
        template = self._record(np.zeros((8, 8), np.uint8), 0, 0, 1)
        empty = {key: np.zeros_like(value) for key, value in template.items()}
        empty["patch_indices"] = np.full_like(template["patch_indices"], -1)
        return empty

    # ----------------------------------------------------- the registry's interface
    def as_data_source(self, split: str) -> DigitsVqaSource:
        if split not in SPLITS:
            raise ValueError(f"{NAME}: split must be one of {SPLITS}, got {split!r}.")
        return DigitsVqaSource(self, split)

    def example_transform(self) -> AddMask:
        return AddMask()

    def eval_example(self, source: DigitsVqaSource) -> PaddedEvalExample:
        return PaddedEvalExample(source, self.empty_example())


@dataclasses.dataclass(frozen=True)
class DigitsVqaSource:
    """grain random-access source over one split (picklable for grain workers)."""

    dataset: DigitsVqa
    split: str

    def __len__(self) -> int:
        return self.dataset.info.splits[self.split]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.dataset.example(self.split, int(index))


DATASET = DigitsVqa()
register_dataset(
    DatasetSpec(
        name=NAME,
        tfds_name=NAME,
        task="solo_vqa",
        num_classes=VOCAB_SIZE,
        input_key="inputs",
        label_key="targets",
        native_shape=(ROW_LENGTH,),
        channels=NUM_CHANNELS,
        max_value=None,
        mean=(PIXEL_MEAN,),
        std=(PIXEL_STD,),
        train_split="train",
        eval_split="test",
        generated=DATASET,
    )
)
