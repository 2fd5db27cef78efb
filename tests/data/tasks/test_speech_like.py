"""The speech-like frames dataset: deterministic records that encode their token sequence."""

from __future__ import annotations

import numpy as np
import pytest

from effformer.data.tasks.speech_like import DATASET, SpeechLikeFrames


def test_records_are_deterministic_and_hold_the_tokens_as_frames():
    data = SpeechLikeFrames(noise_std=0.0, smoothing=(), num_examples={"train": 8, "test": 4})
    again = SpeechLikeFrames(noise_std=0.0, smoothing=(), num_examples={"train": 8, "test": 4})
    for index in range(8):
        record, same = data.example("train", index), again.example("train", index)
        for key in record:
            np.testing.assert_array_equal(record[key], same[key])
        tokens, durations, frames = data.utterance("train", index)
        assert 3 <= len(tokens) <= 12 and np.all((durations >= 2) & (durations <= 6))
        assert np.all(tokens[1:] != tokens[:-1])  # no token repeats its neighbour
        # Without noise or smoothing every frame is its token's prototype.
        np.testing.assert_allclose(frames, np.repeat(data.prototypes[tokens], durations, 0))
        length = int(record["length"])
        want = list(tokens + data.first_token_id) + [data.eos_id]
        np.testing.assert_array_equal(record["targets"][: length + 1], want)
        assert not record["targets"][length + 1 :].any()
        assert record["frame_mask"].sum() == record["num_frames"] == durations.sum()
        assert not record["inputs"][~record["frame_mask"]].any()  # padding frames are zero
    held_out = DATASET.example("test", 0)["inputs"]
    assert not np.array_equal(held_out, DATASET.example("train", 0)["inputs"])
    assert DATASET.info.input_shape == (72, 16) and DATASET.info.vocab_size == 15


def test_smoothing_weights_neighbouring_frames_as_documented():
    # A one-tap kernel was skipped (only kernels longer than 1 were applied).
    sizes = {"train": 2, "test": 1}
    plain = SpeechLikeFrames(noise_std=0.0, smoothing=(), num_examples=sizes)
    doubled = SpeechLikeFrames(noise_std=0.0, smoothing=(2.0,), num_examples=sizes)
    skewed = SpeechLikeFrames(noise_std=0.0, smoothing=(0.0, 0.25, 0.75), num_examples=sizes)
    _, _, clean = plain.utterance("train", 0)
    np.testing.assert_allclose(doubled.utterance("train", 0)[2], 2.0 * clean)
    # Frame t = 0.25 * clean[t] + 0.75 * clean[t + 1], the last frame repeated outward.
    following = np.concatenate([clean[1:], clean[-1:]])
    np.testing.assert_allclose(skewed.utterance("train", 0)[2], 0.25 * clean + 0.75 * following)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="smoothing: expected a 1-D kernel of odd length"):
        SpeechLikeFrames(smoothing=(0.5, 0.5))
    with pytest.raises(ValueError, match="num_examples must have the splits"):
        SpeechLikeFrames(num_examples={"train": 3})
    with pytest.raises(ValueError, match=r"frames_per_token: expected a \(low, high\) pair"):
        SpeechLikeFrames(frames_per_token=(3, 2))
