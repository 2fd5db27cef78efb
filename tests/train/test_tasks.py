"""Each task's loss against a value computed by hand (numpy, float64)."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.train.tasks import TASKS, config_flag, config_number, create_task


def _task(name, info=None, **fields):
    config = ml_collections.ConfigDict(
        dict(
            name=name,
            label_smoothing=0.0,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            mix_switch_prob=0.5,
            distill_temperature=1.0,
            distill_weight=1.0,
        )
    )
    config.update(fields)
    info = info or types.SimpleNamespace(num_classes=3, input_shape=(4, 4, 1), vocab_size=5)
    return create_task(config, info)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )


def test_classification_loss_with_label_smoothing_and_padding_mask():
    task = _task("image_classification", label_smoothing=0.3)
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [5.0, 0.0, 0.0]], np.float32)
    batch = {
        "inputs": jnp.zeros((3, 4, 4, 1)),
        "label": jnp.array([0, 2, 1]),
        "mask": jnp.array([True, True, False]),
    }
    prepared = task.prepare_batch(batch, jax.random.PRNGKey(0), train=True)
    loss_sum, weight, metrics = task.loss_and_metrics(jnp.asarray(logits), prepared)
    targets = np.full((3, 3), 0.1)
    targets[np.arange(3), [0, 2, 1]] += 0.7
    per_example = -(targets * _log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(loss_sum, per_example[:2].sum(), rtol=1e-6)
    assert weight == 2.0
    assert (
        metrics["accuracy"][0] == 2.0
    )  # Both unmasked examples are right; the masked one is not counted.
    # No smoothing at evaluation.
    eval_batch = task.prepare_batch(batch, jax.random.PRNGKey(0), train=False)
    np.testing.assert_array_equal(eval_batch["targets"], np.eye(3)[[0, 2, 1]])


@pytest.mark.parametrize(
    "name, fields, message",
    [
        # A negative alpha used to read as "off": a run without the mixing asked for.
        (
            "image_classification",
            dict(mixup_alpha=-0.8),
            r"config.task.mixup_alpha must be a number >= 0.0",
        ),
        (
            "image_classification",
            dict(cutmix_alpha=float("nan")),
            r"config.task.cutmix_alpha must be a number",
        ),
        (
            "image_classification",
            dict(mix_switch_prob=1.5),
            r"config.task.mix_switch_prob must be a number in \[0.0, 1.0\]",
        ),
        # Tasks that never mix used to ignore a positive alpha without a word.
        (
            "sequence_classification",
            dict(mixup_alpha=0.8),
            r"'sequence_classification' does not mix inputs: config.task.mixup_alpha must be 0, got 0.8",
        ),
        (
            "distillation",
            dict(cutmix_alpha=1.0),
            r"'distillation' does not mix inputs: config.task.cutmix_alpha must be 0",
        ),
        (
            "lm_classification",
            dict(mixup_alpha=0.2, num_classes=3),
            r"'lm_classification' does not mix inputs",
        ),
    ],
)
def test_mixing_settings_a_task_cannot_honour_are_refused(name, fields, message):
    with pytest.raises(ValueError, match=message):
        _task(name, **fields)


def test_classification_mixup_keeps_label_mass():
    task = _task("image_classification", mixup_alpha=0.8, cutmix_alpha=1.0)
    batch = {
        "inputs": jax.random.normal(jax.random.PRNGKey(1), (4, 4, 4, 1)),
        "label": jnp.array([0, 1, 2, 0]),
    }
    prepared = task.prepare_batch(batch, jax.random.PRNGKey(2), train=True)
    np.testing.assert_allclose(prepared["targets"].sum(-1), 1.0, rtol=1e-6)
    assert not np.allclose(prepared["inputs"], batch["inputs"])


def test_distillation_loss_is_t2_scaled_kl_plus_hard_ce():
    task = _task("distillation", distill_temperature=2.0, distill_weight=0.25)
    student = np.array([[1.0, 0.0, -1.0]], np.float32)
    teacher = np.array([[0.0, 2.0, 0.5]], np.float32)
    batch = {
        "inputs": jnp.zeros((1, 4, 4, 1)),
        "label": jnp.array([1]),
        "teacher_logits": jnp.asarray(teacher),
    }
    batch = task.prepare_batch(batch, jax.random.PRNGKey(0), train=True)
    loss_sum, _, _ = task.loss_and_metrics(jnp.asarray(student), batch)
    p_teacher = np.exp(_log_softmax(teacher / 2.0))
    kl = (p_teacher * (np.log(p_teacher) - _log_softmax(student / 2.0))).sum()
    hard = -_log_softmax(student)[0, 1]
    np.testing.assert_allclose(loss_sum, 0.25 * 4.0 * kl + 0.75 * hard, rtol=1e-5)


def test_causal_lm_shifts_targets_and_respects_packing():
    task = _task("causal_lm")
    tokens = np.array([[1, 2, 3, 4]])
    segments = np.array([[1, 1, 2, 2]])
    logits = np.random.default_rng(0).normal(size=(1, 4, 5)).astype(np.float32)
    batch = {"inputs": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)}
    loss_sum, weight, _ = task.loss_and_metrics(jnp.asarray(logits), batch)
    logp = _log_softmax(logits)
    # Position 0 predicts token 2; position 1 would predict the next segment's first token (unscored);
    # position 2 predicts token 4; the last position predicts nothing.
    expected = -(logp[0, 0, 2] + logp[0, 2, 4])
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)
    assert weight == 2.0
    assert set(task.model_inputs(batch)) == {"inputs", "segment_ids"}


def test_causal_lm_does_not_score_padding_after_packed_sequences():
    task = _task("causal_lm")
    batch = {"inputs": jnp.array([[1, 2, 3, 0, 0]]), "segment_ids": jnp.array([[1, 1, 1, 0, 0]])}
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 5)).astype(np.float32))
    _, weight, _ = task.loss_and_metrics(logits, batch)
    assert weight == 2.0  # 1 -> 2 and 2 -> 3 only.


def test_masked_lm_scores_only_corrupted_positions():
    task = _task("masked_lm", mask_token_id=4, mask_rate=0.5)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 4, size=(8, 16)))
    batch = task.prepare_batch({"inputs": tokens}, jax.random.PRNGKey(3), train=True)
    chosen = np.asarray(batch["weights"]) > 0
    assert 0 < chosen.mean() < 1
    unchanged = np.asarray(batch["inputs"]) == np.asarray(tokens)
    assert unchanged[~chosen].all()
    assert (np.asarray(batch["inputs"])[chosen] == 4).mean() > 0.5
    # Evaluation corruption is deterministic.
    a = task.prepare_batch({"inputs": tokens}, jax.random.PRNGKey(1), train=False)
    b = task.prepare_batch({"inputs": tokens}, jax.random.PRNGKey(2), train=False)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    logits = jnp.zeros((8, 16, 5))
    loss_sum, weight, _ = task.loss_and_metrics(logits, batch)
    np.testing.assert_allclose(loss_sum, chosen.sum() * np.log(5), rtol=1e-6)


def test_seq2seq_teacher_forcing_and_padding():
    task = _task("seq2seq", bos_id=0, pad_id=0)
    batch = {"inputs": jnp.array([[3, 4]]), "targets": jnp.array([[2, 3, 0]])}
    inputs = task.model_inputs(batch)
    np.testing.assert_array_equal(inputs["decoder_inputs"], [[0, 2, 3]])
    logits = np.random.default_rng(1).normal(size=(1, 3, 5)).astype(np.float32)
    loss_sum, weight, _ = task.loss_and_metrics(jnp.asarray(logits), batch)
    logp = _log_softmax(logits)
    np.testing.assert_allclose(loss_sum, -(logp[0, 0, 2] + logp[0, 1, 3]), rtol=1e-6)
    assert weight == 2.0


def test_unknown_task_and_missing_batch_key():
    with pytest.raises(ValueError, match="config.task.name must be one of"):
        _task("regression")
    task = _task("distillation")
    with pytest.raises(ValueError, match="teacher_logits"):
        task.check_batch({"inputs": 0, "label": 0})
    assert {
        "image_classification",
        "sequence_classification",
        "causal_lm",
        "masked_lm",
        "seq2seq",
        "distillation",
    } <= set(TASKS)


def test_lm_classification_takes_classes_and_vocabulary_from_the_task_config():
    # A token dataset's info gives its vocabulary as num_classes (digits_pixels: 18).
    info = types.SimpleNamespace(num_classes=18, input_shape=(6,), vocab_size=18)
    task = _task("lm_classification", info, num_classes=3, vocab_size=19, label_smoothing=0.2)
    assert task.model_overrides() == {"num_classes": 3, "vocab_size": 19}
    tokens = jnp.array([[1, 2, 3, 0, 0, 17], [4, 4, 4, 4, 4, 17]])
    batch = {"inputs": tokens, "label": jnp.array([2, 0]), "mask": jnp.array([True, True])}
    assert set(task.model_inputs(batch)) == {"inputs"}
    prepared = task.prepare_batch(batch, jax.random.PRNGKey(0), train=True)
    logits = np.array([[0.3, -1.0, 2.0], [1.5, 0.5, 0.0]], np.float32)
    loss_sum, weight, metrics = task.loss_and_metrics(jnp.asarray(logits), prepared)
    targets = np.full((2, 3), 0.2 / 3)
    targets[[0, 1], [2, 0]] += 0.8
    np.testing.assert_allclose(loss_sum, -(targets * _log_softmax(logits)).sum(), rtol=1e-6)
    assert weight == 2.0 and metrics["accuracy"][0] == 2.0
    with pytest.raises(ValueError, match=r"config.task.num_classes must be an int >= 2.*got 0"):
        _task("lm_classification", info)


def test_task_vocab_size_enlarges_the_model_vocabulary_for_the_mask_token():
    info = types.SimpleNamespace(num_classes=18, input_shape=(6,), vocab_size=18)
    assert _task("causal_lm", info).model_overrides() == {"vocab_size": 18}
    assert _task("causal_lm", info, vocab_size=19).model_overrides() == {"vocab_size": 19}
    with pytest.raises(ValueError, match=r"vocab_size must be 0.*>= the data's vocabulary 18"):
        _task("causal_lm", info, vocab_size=17)
    with pytest.raises(ValueError, match=r"mask_token_id must be a token id in \[0, 18\).*got 18"):
        _task("masked_lm", info, mask_token_id=18)
    task = _task("masked_lm", info, mask_token_id=18, vocab_size=19, mask_rate=0.5, pad_id=-1)
    assert task.model_overrides() == {"vocab_size": 19}
    # pad_id=-1: every token is real, so token 0 (a pixel value here) is masked too.
    batch = task.prepare_batch(
        {"inputs": jnp.zeros((4, 16), jnp.int32)}, jax.random.PRNGKey(1), True
    )
    chosen = np.asarray(batch["weights"]) > 0
    assert 0.3 < chosen.mean() < 0.7
    # Replacements are the mask token or data tokens, never beyond the data's vocabulary.
    assert np.asarray(batch["inputs"]).max() <= 18


def test_config_number_and_flag_read_checked_task_fields():
    config = ml_collections.ConfigDict({"weight": 2, "count": 3, "on": False, "flag": 1})
    assert config_number(config, "weight", 1.0, low=0) == 2.0
    assert config_number(config, "missing", 0.5, low=0, high=1) == 0.5
    assert config_number(None, "weight", 0.25, low=0) == 0.25
    count = config_number(config, "count", 1, low=1, integer=True)
    assert count == 3 and isinstance(count, int)
    assert config_flag(config, "on", True) is False and config_flag(None, "on", True) is True
    with pytest.raises(ValueError, match=r"config.task.weight must be a number in \[0, 1\], got 2"):
        config_number(config, "weight", 1.0, low=0, high=1)
    with pytest.raises(
        ValueError, match=r"config.task.weight must be an int >= 3 \(a size\), got 2"
    ):
        config_number(config, "weight", 3, low=3, integer=True, what="a size")
    with pytest.raises(ValueError, match=r"config.task.on must be a number >= 0, got False"):
        config_number(config, "on", 1.0, low=0)
    with pytest.raises(ValueError, match=r"config.task.flag must be True or False, got 1"):
        config_flag(config, "flag", True)


def test_config_number_refuses_nan():
    config = ml_collections.ConfigDict({"rate": float("nan")})
    with pytest.raises(ValueError, match=r"config.task.rate must be a number in \[0, 1\], got nan"):
        config_number(config, "rate", 0.5, low=0, high=1)


@pytest.mark.parametrize(
    "name, fields, field",
    [
        ("image_classification", dict(label_smoothing=-0.1), "label_smoothing"),
        ("image_classification", dict(label_smoothing=1.5), "label_smoothing"),
        ("distillation", dict(distill_temperature=0.0), "distill_temperature"),
        ("distillation", dict(distill_temperature=-2.0), "distill_temperature"),
        ("distillation", dict(distill_weight=1.5), "distill_weight"),
        ("masked_lm", dict(mask_token_id=4, mask_rate=0.0), "mask_rate"),
        ("masked_lm", dict(mask_token_id=4, mask_rate=1.5), "mask_rate"),
    ],
)
def test_task_numbers_out_of_range_are_refused(name, fields, field):
    # Each would otherwise train silently: negative targets, a NaN loss (T = 0), a
    # negatively weighted term, or batches with nothing scored.
    with pytest.raises(ValueError, match=f"config.task.{field} must be"):
        _task(name, **fields)


def test_a_prefix_lm_trains_with_its_prompt_as_prefix(make_config):
    # Regression: the generated tasks' records carry prompt_length, not prefix_lengths, so
    # a prefix LM got no prefix and trained causal everywhere, as a decoder.
    from effformer.data import default_data_config
    from effformer.train.experiment import build_experiment

    config = make_config(mesh__num_devices=1)
    config.data = default_data_config("reverse")
    config.model.name, config.model.tiny, config.task.name = "lm_prefix", True, "causal_lm"
    exp = build_experiment(config)
    batch = {"inputs": np.ones((2, 6), np.int32), "prompt_length": np.array([3, 4], np.int32)}
    np.testing.assert_array_equal(exp.task.model_inputs(batch)["prefix_lengths"], [3, 4])
    given = {**batch, "prefix_lengths": np.array([1, 2], np.int32)}  # the records' own win
    np.testing.assert_array_equal(exp.task.model_inputs(given)["prefix_lengths"], [1, 2])
    with pytest.raises(ValueError, match="a prefix LM needs each row's prefix"):
        exp.task.model_inputs({"inputs": batch["inputs"]})
    config.model.name = "lm_decoder"  # a decoder is given no prefix
    assert "prefix_lengths" not in build_experiment(config).task.model_inputs(batch)
    config.model.name, config.data.packing = "lm_prefix", True
    with pytest.raises(ValueError, match="packing must be False for a prefix LM"):
        build_experiment(config)


@pytest.mark.parametrize(
    "name, packs", [("lm_decoder", True), ("lm_hybrid_mamba", False), ("mamba_130m", False)]
)
def test_packed_data_is_refused_for_models_that_would_mix_the_sequences(make_config, name, packs):
    # Regression: Mamba (and LMU, Combiner) layers read segment ids as padding only, so a
    # packed row silently mixed its sequences.
    from effformer.data import default_data_config
    from effformer.train.experiment import build_experiment

    config = make_config(mesh__num_devices=1)
    config.data = default_data_config("reverse")
    config.data.packing = True
    config.model.name, config.model.tiny, config.task.name = name, True, "causal_lm"
    if packs:
        assert build_experiment(config).model.supports_packing
    else:
        with pytest.raises(ValueError, match="packing must be False for config.model.name"):
            build_experiment(config)
