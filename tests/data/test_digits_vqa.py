"""The ``digits_vqa`` dataset: SOLO's layout, the patches, the answers, the loss weights,
determinism, the split, and the eval pipeline."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from effformer.data import create_input_pipeline, default_data_config, get_dataset_info
from effformer.data import digits_vqa as vqa
from effformer.data.embedded.digits import digits_split_indices

WORD = {symbol: index for index, symbol in enumerate(vqa.SYMBOLS)}


def _words(ids):
    return [vqa.SYMBOLS[i] for i in ids]


def test_info_describes_the_records_and_the_patches():
    info = get_dataset_info(default_data_config("digits_vqa"))
    assert (info.task, info.input_shape, info.vocab_size) == ("solo_vqa", (31,), 31)
    assert info.splits == {"train": 1437 * 4, "test": 360 * 4}
    assert info.question_types == vqa.QUESTION_TYPES
    assert (info.patch_size, info.num_channels) == (4, 1)


def test_records_lay_out_the_image_question_and_answer_as_solo_does():
    digits = load_digits()
    rows = digits_split_indices()["test"]
    for index in range(8):  # two images, every question
        record = vqa.DATASET.example("test", index)
        image, question_type = divmod(index, 4)
        digit = int(digits.target[rows[image]])
        inputs, targets = record["inputs"], record["targets"]
        length = int(record["prompt_length"])
        sequence = [*inputs[:length], *targets[length - 1 :]]
        words = _words(sequence)
        # <vision>, 4 rows of 4 patches with a separator before rows 2-4, </vision>.
        expected_image = ["<vision>"]
        for row in range(4):
            expected_image += (["<vrow_sep>"] if row else []) + ["<vpatch>"] * 4
        expected_image += ["</vision>"]
        assert words[:21] == expected_image
        patch_tokens = np.flatnonzero(inputs == WORD["<vpatch>"])
        assert record["patch_indices"][patch_tokens].tolist() == list(range(16))
        others = np.setdiff1d(np.arange(vqa.ROW_LENGTH), patch_tokens)
        assert (record["patch_indices"][others] == -1).all()
        # Question, then the answer and <eos>, then padding.
        question = words[21:length]
        answer = words[length]
        assert words[length + 1] == "<eos>" and set(words[length + 2 :]) <= {"<pad>"}
        name = vqa.QUESTION_TYPES[question_type]
        assert int(record["question_type"]) == question_type and int(record["label"]) == digit
        if name == "what_digit":
            assert (question, answer) == (["what", "digit", "is", "this", "?"], str(digit))
        elif name == "is_even":
            assert answer == ("yes" if digit in (0, 2, 4, 6, 8) else "no")
        elif name == "greater_than_4":
            assert answer == ("yes" if digit >= 5 else "no")
        else:
            k = int(question[5])
            assert question[:5] == ["what", "is", "the", "digit", "plus"] and 1 <= k <= 9
            assert int(answer) == (digit + k) % 10
        # The loss covers the answer and <eos> only: weights are 1 exactly at their targets.
        assert np.flatnonzero(record["weights"]).tolist() == [length - 1, length]
        # Patches: the image / 16 upscaled 2x, normalised, 4x4 blocks in raster order.
        pixels = digits.images[rows[image]] / 16.0
        for patch in (0, 6, 15):
            r, c = divmod(patch, 4)
            block = [pixels[(4 * r + i) // 2, (4 * c + j) // 2] for i in range(4) for j in range(4)]
            expected = (np.array(block) - vqa.PIXEL_MEAN) / vqa.PIXEL_STD
            np.testing.assert_allclose(record["patches"][patch], expected, rtol=1e-6)


def test_records_are_deterministic_and_the_splits_share_no_image():
    fresh = vqa.DigitsVqa()
    for split, index in (("train", 0), ("train", 5747), ("test", 1439), ("test", 3)):
        a, b = vqa.DATASET.example(split, index), fresh.example(split, index)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    split = digits_split_indices()
    assert not set(split["train"]) & set(split["test"])
    with pytest.raises(IndexError, match="index 1440 out of range for split 'test'"):
        vqa.DATASET.example("test", 1440)
    with pytest.raises(ValueError, match="split must be one of"):
        vqa.DATASET.example("validation", 0)


def test_the_eval_pipeline_pads_with_masked_rows_without_patches():
    pipeline = create_input_pipeline(
        default_data_config("digits_vqa"), split="test", global_batch_size=512, train=False, seed=0
    )
    batches = list(pipeline)
    assert len(batches) == 3 and int(sum(b["mask"].sum() for b in batches)) == 1440
    last = batches[-1]
    assert last["patches"].shape == (512, 16, 16) and last["patch_indices"].shape == (512, 31)
    padded = ~last["mask"]
    assert (last["weights"][padded] == 0).all() and (last["patch_indices"][padded] == -1).all()
