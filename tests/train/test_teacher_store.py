"""TinyViT's sparse distillation: the teacher store, its replay, the rebuilt labels, refusals.

The teacher is the trainer tests' baseline run (the tiny MLP, 6 steps on digits);
the student's stream is digits with random crops and erasing, seed 5.
"""

import json
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.data import create_input_pipeline, validate_data_config
from effformer.data.registry import get_dataset_spec, load_builder
from effformer.data.teacher_store import (
    MANIFEST,
    TeacherStoreError,
    TeacherStoreWriter,
    fingerprint,
    open_teacher_store,
    rebuild_teacher_probs,
    shard_name,
)
from effformer.train import restore, train_and_evaluate
from effformer.train.tasks import create_task
from effformer.train.teacher_logits import check_teacher_store, save_teacher_logits

TOP_K = 3
NUM_TRAIN = 1437  # digits' train split


def _student(teacher_config, **changes):
    config = ml_collections.ConfigDict(teacher_config.to_dict())
    config.task.name = "distillation"
    config.seed = 5
    config.num_train_steps = 3
    config.data.crop_padding = 1
    config.data.random_erasing = 0.5
    for dotted, value in changes.items():
        parent = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            parent = parent[part]
        parent[leaf] = value
    return config


@pytest.fixture(scope="module")
def saved(baseline_run, tmp_path_factory):
    """A one-epoch store of the student's stream, K = 3, float32 values."""
    teacher_config, teacher_dir, _ = baseline_run
    out = tmp_path_factory.mktemp("teacher_store") / "store"
    # Two teacher batches of 720: the second runs 3 positions past the epoch (dropped).
    manifest = save_teacher_logits(
        _student(teacher_config),
        teacher_dir,
        out,
        top_k=TOP_K,
        epochs=1,
        batch_size=720,
        values_dtype="float32",
    )
    return teacher_config, teacher_dir, out, manifest


def _reference_rebuild(values, indices, num_classes):
    """The official recipe row by row: rest spread over the other classes, top-K scattered."""
    dense = np.zeros((len(values), num_classes))
    for row, (vals, idxs) in enumerate(zip(values, indices, strict=True)):
        others = num_classes - len(vals)
        rest = max(1.0 - float(np.sum(vals, dtype=np.float64)), 0.0)
        for c in range(num_classes):
            dense[row, c] = rest / others if others else 0.0
        for v, c in zip(vals, idxs, strict=True):
            dense[row, c] = v
        dense[row] /= dense[row].sum()
    return dense


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top(probs, k):
    indices = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(probs, indices, -1), indices


def test_rebuilt_distribution_is_the_official_recipe_and_sums_to_one():
    rebuild = jax.jit(rebuild_teacher_probs, static_argnums=2)
    probs = _softmax(np.random.default_rng(0).normal(size=(4, 10)) * 3)
    for k in (3, 10):
        values, indices = _top(probs, k)
        for dtype in (np.float32, np.float16):  # float16: the official storage
            stored = values.astype(dtype)
            rebuilt = np.asarray(rebuild(stored, indices, 10))
            reference = _reference_rebuild(stored.astype(np.float64), indices, 10)
            np.testing.assert_allclose(rebuilt, reference, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(rebuilt.sum(-1), 1.0, rtol=1e-6)
            np.testing.assert_array_equal(np.take_along_axis(rebuilt, indices, -1) > 0, True)
    # K = C: the dense softmax itself.
    values, indices = _top(probs, 10)
    np.testing.assert_allclose(rebuild(values, indices, 10), probs, rtol=1e-6)
    with pytest.raises(ValueError, match=r"values, indices: expected matching shapes"):
        rebuild_teacher_probs(values, indices[:, :3], 10)


def _distill_task(temperature, weight, classes=5):
    config = ml_collections.ConfigDict(
        dict(
            name="distillation",
            label_smoothing=0.0,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            mix_switch_prob=0.5,
            distill_temperature=temperature,
            distill_weight=weight,
        )
    )
    return create_task(config, types.SimpleNamespace(num_classes=classes, input_shape=(4, 4, 1)))


def test_sparse_distillation_loss_and_gradient_match_a_float64_reference():
    temperature, weight, classes = 2.0, 0.5, 5
    task = _distill_task(temperature, weight, classes)
    rng = np.random.default_rng(1)
    student = rng.normal(size=(2, classes))
    teacher_logits = rng.normal(size=(2, classes)) * 2
    labels = np.array([1, 4])
    values, indices = _top(_softmax(teacher_logits), 2)

    def reference(student_logits):
        p = _reference_rebuild(values, indices, classes) ** (1 / temperature)
        p /= p.sum(-1, keepdims=True)
        q_log = np.log(_softmax(student_logits / temperature))
        kl = (p * (np.log(p) - q_log)).sum(-1)
        hard = -np.log(_softmax(student_logits))[np.arange(2), labels]
        return (weight * temperature**2 * kl + (1 - weight) * hard).sum()

    @jax.jit
    @jax.value_and_grad
    def loss(student_logits, batch):
        prepared = task.prepare_batch(batch, jax.random.PRNGKey(0), train=True)
        return task.loss_and_metrics(student_logits, prepared)[0]

    sparse = {
        "inputs": jnp.zeros((2, 4, 4, 1)),
        "label": jnp.asarray(labels),
        "teacher_topk_values": jnp.asarray(values, jnp.float32),
        "teacher_topk_indices": jnp.asarray(indices, jnp.int32),
    }
    logits = jnp.asarray(student, jnp.float32)
    value, grad = loss(logits, sparse)
    np.testing.assert_allclose(value, reference(student), rtol=1e-5)
    step = 1e-6
    numeric = np.zeros_like(student)
    for i in np.ndindex(*student.shape):
        delta = np.zeros_like(student)
        delta[i] = step
        numeric[i] = (reference(student + delta) - reference(student - delta)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)

    # K = C: the same loss and gradient as the dense teacher logits, at T = 2.
    all_values, all_indices = _top(_softmax(teacher_logits), classes)
    full = dict(sparse, teacher_topk_values=all_values, teacher_topk_indices=all_indices)
    dense = {key: sparse[key] for key in ("inputs", "label")}
    dense["teacher_logits"] = jnp.asarray(teacher_logits, jnp.float32)
    for a, b in zip(
        loss(logits, full),
        loss(logits, dense),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # No teacher: refused in training; evaluation scores the labels.
    plain = {key: sparse[key] for key in ("inputs", "label")}
    with pytest.raises(ValueError, match=r"teacher_logits.*teacher_topk_values"):
        task.prepare_batch(plain, jax.random.PRNGKey(0), train=True)

    @jax.jit
    def evaluate(student_logits, batch):
        prepared = task.prepare_batch(batch, jax.random.PRNGKey(0), train=False)
        return task.loss_and_metrics(student_logits, prepared)

    eval_loss, _, metrics = evaluate(logits, plain)
    hard = -np.log(_softmax(student))[np.arange(2), labels].sum()
    np.testing.assert_allclose(eval_loss, hard, rtol=1e-5)
    assert "distill_kl" not in metrics


def test_replay_on_other_hosts_and_batches_gives_the_teachers_images_and_topk(saved):
    teacher_config, teacher_dir, store_dir, manifest = saved
    assert manifest["epochs"] == 1 and manifest["shards"][0]["rows"] == NUM_TRAIN
    config = _student(teacher_config, data__teacher_store=str(store_dir))
    # Host 1 of 2, global batches of 64 (the save pass used one host, batches of 720),
    # from global batch 5 on: stream positions 321, 323, ..., 383.
    pipeline = create_input_pipeline(
        config.data, split="train", global_batch_size=64, train=True, seed=5,
        process_index=1, process_count=2,
    )  # fmt: skip
    pipeline.set_state({**pipeline.get_state(), "next_batch": 5})
    batch = next(pipeline)
    positions = 5 * 64 + 1 + 2 * np.arange(32)

    # The teacher, run here on the replayed images, gives the stored top-K.
    run = restore(teacher_dir)
    probs = jax.nn.softmax(run.model.apply({"params": run.params}, inputs=batch["inputs"]))
    values, indices = jax.lax.top_k(probs, TOP_K)
    np.testing.assert_allclose(batch["teacher_topk_values"], values, rtol=1e-5)
    np.testing.assert_array_equal(batch["teacher_topk_indices"], indices)

    # The rows of those positions: the images the teacher saw, their records and labels.
    shard = np.load(store_dir / shard_name(0))
    rows = shard[positions]
    np.testing.assert_array_equal(batch["teacher_topk_values"], rows["values"])
    replayed = [fingerprint(x, y) for x, y in zip(batch["inputs"], batch["label"], strict=True)]
    np.testing.assert_array_equal(replayed, rows["fingerprint"])
    source = load_builder(get_dataset_spec("digits"), config.data.data_dir).as_data_source("train")
    np.testing.assert_array_equal([source[int(r)]["label"] for r in rows["record"]], batch["label"])
    assert sorted(shard["record"]) == list(range(NUM_TRAIN))  # one epoch: each record once

    # Another image at a position is caught.
    store = open_teacher_store(store_dir)
    example = {"inputs": batch["inputs"][1], "label": batch["label"][1]}
    assert store.attach(int(positions[1]), example)["teacher_topk_indices"].shape == (TOP_K,)
    with pytest.raises(TeacherStoreError, match=r"position 321 .* differs from the one"):
        store.attach(int(positions[0]), example)


def test_positions_across_epochs_read_their_epochs_rows(make_config, tmp_path):
    # A hand-written two-epoch store whose values encode the position: global batch 22 of 64
    # (positions 1408..1471) straddles the end of epoch 0.
    config = make_config(task__name="distillation", data__crop_padding=1)
    plain = create_input_pipeline(
        config.data, split="train", global_batch_size=64, train=True, seed=0
    )
    plain.set_state({**plain.get_state(), "next_batch": 22})
    window = next(plain)
    positions = np.arange(22 * 64, 23 * 64)
    stream = dict(
        dataset="digits", split="train", num_examples=NUM_TRAIN, num_classes=10, seed=0,
        image_size=None, crop_padding=1, flip=False, randaugment_num_layers=0,
        randaugment_magnitude=0.0, random_erasing=0.0,
    )  # fmt: skip
    writer = TeacherStoreWriter(
        tmp_path / "store", stream, top_k=2, epochs=2, values_dtype="float32"
    )
    every = np.arange(2 * NUM_TRAIN)
    prints = np.zeros(len(every), np.uint32)
    prints[positions] = [
        fingerprint(x, y) for x, y in zip(window["inputs"], window["label"], strict=True)
    ]
    values = np.stack([every, -every], axis=1).astype(np.float32)
    for chunk in np.array_split(every, 5):  # batches that straddle the epoch end
        writer.add(prints[chunk], values[chunk], np.stack([chunk % 10, chunk % 7], axis=1))
    writer.finish()
    with pytest.raises(FileExistsError, match=r"already holds a teacher store"):
        TeacherStoreWriter(tmp_path / "store", stream, top_k=2, epochs=2)

    config.data.teacher_store = str(tmp_path / "store")
    replay = create_input_pipeline(
        config.data, split="train", global_batch_size=64, train=True, seed=0
    )
    replay.set_state({**replay.get_state(), "next_batch": 22})
    batch = next(replay)
    np.testing.assert_array_equal(batch["inputs"], window["inputs"])
    np.testing.assert_array_equal(batch["teacher_topk_values"][:, 0], positions)
    np.testing.assert_array_equal(batch["teacher_topk_indices"][:, 1], positions % 7)
    store = open_teacher_store(tmp_path / "store")
    assert sorted(store.shard(1)["record"]) == list(range(NUM_TRAIN))
    assert store.row(NUM_TRAIN + 3)["values"][0] == NUM_TRAIN + 3
    with pytest.raises(TeacherStoreError, match=r"holds 2 epochs .* position 2874 is in epoch 2"):
        store.row(2 * NUM_TRAIN)


def test_a_store_of_another_stream_or_a_run_past_its_epochs_is_refused(saved):
    teacher_config, _, store_dir, _ = saved
    check_teacher_store(_student(teacher_config, data__teacher_store=str(store_dir)), 44)
    for change, key in (
        (dict(seed=6), "seed"),
        (dict(data__crop_padding=2), "crop_padding"),
        (dict(data__random_erasing=0.25), "random_erasing"),
        (dict(data__flip=True), "flip"),
    ):
        config = _student(teacher_config, data__teacher_store=str(store_dir), **change)
        with pytest.raises(TeacherStoreError, match=rf"with {key}=.*but this run's stream has"):
            check_teacher_store(config, 3)
    # The pipeline checks the store too (a run without the trainer's check).
    config = _student(teacher_config, data__teacher_store=str(store_dir), seed=6)
    with pytest.raises(TeacherStoreError, match=r"seed=5, but this run's stream has seed=6"):
        create_input_pipeline(config.data, split="train", global_batch_size=32, train=True, seed=6)
    # 45 steps of 32 read 1440 > 1437 examples: two epochs.
    config = _student(teacher_config, data__teacher_store=str(store_dir))
    with pytest.raises(ValueError, match=r"holds 1 epochs .* 1440 examples \(2 epochs\)"):
        check_teacher_store(config, 45)
    config = _student(
        teacher_config, data__teacher_store=str(store_dir), task__name="image_classification"
    )
    with pytest.raises(ValueError, match=r"would ignore the stored teacher labels"):
        check_teacher_store(config, 3)
    with pytest.raises(ValueError, match=r"'teacher_store': expected \"\" for 'copy'"):
        validate_data_config({"name": "copy", "teacher_store": str(store_dir)})


def test_a_corrupt_or_missing_shard_or_manifest_is_refused(saved, tmp_path):
    store_dir = saved[2]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(store_dir, target)
        return target, target / shard_name(0)

    target, shard = copy("missing")
    shard.unlink()
    with pytest.raises(TeacherStoreError, match=r"epoch_00000.npy \(epoch 0\) is missing"):
        open_teacher_store(target)

    target, shard = copy("truncated")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TeacherStoreError, match=r"is corrupt: \d+ bytes, expected"):
        open_teacher_store(target)

    target, shard = copy("flipped")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = open_teacher_store(target)  # The headers are fine; the content is checked on use.
    with pytest.raises(TeacherStoreError, match=r"is corrupt: SHA-256"):
        store.row(0)

    target, _ = copy("edited")
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["stream"]["seed"] = 6
    (target / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TeacherStoreError, match=r"does not match its stream_hash"):
        open_teacher_store(target)

    (target / MANIFEST).unlink()
    with pytest.raises(TeacherStoreError, match=r"no manifest.json"):
        open_teacher_store(target)


def test_student_trains_from_the_store(saved, tmp_path):
    teacher_config, _, store_dir, _ = saved
    config = _student(teacher_config, data__teacher_store=str(store_dir), log_every_steps=1)
    result = train_and_evaluate(config, tmp_path)
    assert result["step"] == 3
    train = result["train"]
    assert np.isfinite(train["loss"]) and train["loss"] == pytest.approx(train["distill_kl"])
    assert set(result["eval"]) == {"loss", "accuracy"}  # Evaluation scores the labels.
