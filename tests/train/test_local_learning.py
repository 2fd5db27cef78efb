"""Local learning (effformer/models/local_learning.py, effformer/train/local_learning.py).

The claims tested: no gradient crosses a module boundary (module k's loss gives
every other module a zero gradient, and the summed loss gives module j the
gradient of its own loss); one module is end-to-end training of the backbone;
the reconstruction targets are the module's input tokens (or the image), stopped;
the task's loss is the sum of the local losses (against numpy in float64); the
sequential step gives the single step's loss and gradients, and the trainer's
step with ``local_schedule = "sequential"`` the same update as with "joint"
(bit for bit in float32, with dropout and two micro-batches); bad K and unknown
schedules are refused; the trainer runs the task.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.models.local_learning import (
    FeatureDecoder,
    ImageDecoder,
    LocalLearningViT,
    module_boundaries,
)
from effformer.train.local_learning import sequential_value_and_grad
from effformer.train.tasks import create_task

INFO = types.SimpleNamespace(num_classes=10, input_shape=(8, 8, 1))
BATCH_SIZE = 4


def _task(reconstruction_weight: float = 0.5, classification_weight: float = 0.8):
    config = ml_collections.ConfigDict(
        dict(
            name="local_learning",
            label_smoothing=0.1,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            mix_switch_prob=0.5,
            local_reconstruction_weight=reconstruction_weight,
            local_classification_weight=classification_weight,
        )
    )
    return create_task(config, INFO)


def _model(**fields) -> LocalLearningViT:
    kwargs = {**dict(num_layers=3, num_modules=3, decoder="linear"), **fields}
    return models.create("local_learning_vit", tiny=True, **kwargs)


@functools.cache
def _setup(**fields):
    model = _model(**fields)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(BATCH_SIZE, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray([0, 3, 7, 3])
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), **model.dummy_inputs(1))
    batch = _task().prepare_batch(
        {"inputs": images, "label": labels}, jax.random.PRNGKey(0), train=True
    )
    return model, variables["params"], batch


DROPOUT_RNG = jax.random.PRNGKey(3)


@functools.cache
def _weighted_grad():
    """jit: (params, c [K]) -> grad of sum_k c_k * (module k's local loss), dropout on.

    c one-hot: one module's loss; c all ones: the task's summed loss (what the
    trainer differentiates). One compiled program for every c.
    """
    model, _, batch = _setup()
    task = _task()

    def weighted(params, c):
        outputs = model.apply(
            {"params": params}, inputs=batch["inputs"], train=True, rngs={"dropout": DROPOUT_RNG}
        )
        losses = [
            jnp.sum(
                task.module_losses(
                    k, model.num_modules, outputs["logits"][k], outputs["reconstruction"][k], batch
                )[0]
            )
            for k in range(model.num_modules)
        ]
        return jnp.dot(c, jnp.stack(losses))

    return jax.jit(jax.value_and_grad(weighted))


def test_no_gradient_crosses_a_module_boundary():
    model, params, _ = _setup()
    grad_fn = _weighted_grad()
    num_modules = model.num_modules
    per_module = [grad_fn(params, jnp.eye(num_modules)[k])[1] for k in range(num_modules)]
    _, total = grad_fn(params, jnp.ones(num_modules))
    owner = {name: k for k in range(num_modules) for name in model.module_param_names(k)}
    assert set(owner) == set(params)
    for name in params:
        for k in range(num_modules):
            norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(per_module[k][name]))
            if owner[name] == k:
                assert norm > 0, f"module {k}'s loss does not reach its own {name}"
            else:
                assert norm == 0.0, f"module {k}'s loss reaches {name} of module {owner[name]}"
        # The summed loss gives each module the gradient of its own loss alone.
        own = per_module[owner[name]][name]
        for got, want in zip(jax.tree.leaves(total[name]), jax.tree.leaves(own), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_one_module_is_end_to_end_training_of_the_backbone():
    local = _model(num_modules=1)
    backbone = models.create("cct_2_3x2", tiny=True, num_layers=3, image_size=8, num_channels=1)
    _, three_params, batch = _setup()
    # The backbone's parameters are those of any K, without the local heads and decoders.
    params = {name: three_params[name] for name in local.module_param_names(0)}
    shapes = jax.eval_shape(local.init, jax.random.PRNGKey(1), **local.dummy_inputs(1))
    backbone_shapes = jax.eval_shape(
        backbone.init, jax.random.PRNGKey(1), **backbone.dummy_inputs(1)
    )
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes["params"])
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, backbone_shapes["params"])
    task = _task(reconstruction_weight=3.0)
    plain = create_task(
        ml_collections.ConfigDict({**task.config.to_dict(), "name": "image_classification"}), INFO
    )

    @jax.jit
    def both(params):
        def local_loss(p):
            return task.loss_and_metrics(local.apply({"params": p}, inputs=batch["inputs"]), batch)[
                0
            ]

        def plain_loss(p):
            logits = backbone.apply({"params": p}, inputs=batch["inputs"])
            return plain.loss_and_metrics(logits, batch)[0]

        return jax.value_and_grad(local_loss)(params), jax.value_and_grad(plain_loss)(params)

    (local_value, local_grads), (plain_value, plain_grads) = both(params)
    np.testing.assert_allclose(local_value, plain_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(local_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_feature_targets_are_the_module_inputs_and_stopped():
    model, params, batch = _setup()
    images = batch["inputs"]

    @jax.jit
    def run(params):
        full = model.apply({"params": params}, inputs=images)
        first = model.apply({"params": params}, inputs=images, local_module=0)
        second = model.apply(
            {"params": params}, inputs=images, local_module=1, features=first["features"]
        )

        def error(features):
            out = model.apply({"params": params}, inputs=images, local_module=1, features=features)
            return jnp.sum(out["reconstruction"])

        return full, first, second, jax.grad(error)(first["features"])

    full, first, second, features_grad = run(params)
    # Module 1 reconstructs module 0's output (its input) with its linear decoder.
    h0 = np.asarray(first["features"], np.float64)
    h1 = np.asarray(second["features"], np.float64)
    dense = params["decoder_1"]["out"]
    prediction = h1 @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"])
    want = ((prediction - h0) ** 2).reshape(BATCH_SIZE, -1).mean(-1)
    np.testing.assert_allclose(second["reconstruction"], want, rtol=1e-5)
    # Running the modules one by one is the whole model's call.
    np.testing.assert_allclose(full["reconstruction"][1], want, rtol=1e-5)
    np.testing.assert_allclose(full["logits"][1], second["logits"], rtol=1e-5, atol=1e-6)
    # The target is stopped: the error does not push module 0's features.
    assert float(jnp.max(jnp.abs(features_grad))) == 0.0


def test_image_target_is_the_input_image():
    _, params, batch = _setup()
    model = _model(reconstruction="image")
    images = batch["inputs"]
    decoder = ImageDecoder(8, 1, 12, model.token_grid, model.num_prefix_tokens)

    @jax.jit
    def run(params):
        # The default model's parameters with InfoPro's decoders in place of the linear ones.
        tokens = jnp.zeros((1, model.sequence_length, model.embed_dim))
        decoders = {
            f"decoder_{k}": decoder.init(jax.random.PRNGKey(k), tokens)["params"]
            for k in range(model.num_modules - 1)
        }
        params = {**params, **decoders}
        first = model.apply({"params": params}, inputs=images, local_module=0)
        return first, decoder.apply({"params": params["decoder_0"]}, first["features"])

    first, decoded = run(params)
    assert decoded.shape == images.shape
    want = ((np.asarray(decoded, np.float64) - np.asarray(images)) ** 2).mean((1, 2, 3))
    np.testing.assert_allclose(first["reconstruction"], want, rtol=1e-5)


def test_task_loss_is_the_sum_of_local_losses():
    task = _task(reconstruction_weight=0.5, classification_weight=0.8)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 10))
    errors = np.abs(rng.normal(size=(3, 4)))
    errors[-1] = 0.0
    batch = task.prepare_batch(
        {
            "inputs": jnp.zeros((4, 8, 8, 1)),
            "label": jnp.asarray([1, 2, 3, 4]),
            "mask": jnp.asarray([True, True, True, False]),
        },
        jax.random.PRNGKey(0),
        train=True,
    )
    outputs = {"logits": jnp.asarray(logits, jnp.float32), "reconstruction": jnp.asarray(errors)}
    loss, weight, metrics = task.loss_and_metrics(outputs, batch)
    targets = np.full((4, 10), 0.01)
    targets[np.arange(4), [1, 2, 3, 4]] += 0.9
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -(targets * log_p).sum(-1)  # [K, B]
    per_example = ce[-1] + (0.8 * ce[:-1] + 0.5 * errors[:-1]).sum(0)
    np.testing.assert_allclose(loss, per_example[:3].sum(), rtol=1e-5)
    assert weight == 3.0
    np.testing.assert_allclose(
        metrics["module_1/reconstruction"][0], errors[1, :3].sum(), rtol=1e-6
    )
    assert metrics["accuracy"][0] == float((logits[-1, :3].argmax(-1) == [1, 2, 3]).sum())


def test_sequential_step_equals_the_single_step_with_dropout():
    model, params, batch = _setup()
    task = _task()
    value, grads = _weighted_grad()(params, jnp.ones(model.num_modules))
    (seq_value, (weight, metrics)), seq_grads = jax.jit(
        lambda p: sequential_value_and_grad(model, task, p, batch, DROPOUT_RNG)
    )(params)
    np.testing.assert_allclose(seq_value, value, rtol=1e-6)
    assert weight == BATCH_SIZE and "module_1/reconstruction" in metrics
    assert jax.tree.structure(seq_grads) == jax.tree.structure(grads)
    for got, want in zip(jax.tree.leaves(seq_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("num_modules", "match"),
    [
        (2, "num_modules must divide num_layers=3"),
        (0, "num_modules must be an int >= 1"),
        (True, "num_modules must be an int >= 1"),
    ],
)
def test_bad_number_of_modules_is_refused(num_modules, match):
    with pytest.raises(ValueError, match=match):
        module_boundaries(3, num_modules)
    with pytest.raises(ValueError, match=f"LocalLearningViT: {match}"):
        _model(num_modules=num_modules).check_config()


def test_the_trainer_trains_the_task(make_config, tmp_path):
    from effformer.train import train_and_evaluate

    config = make_config(
        model__name="local_learning_vit",
        model__tiny=True,
        task__name="local_learning",
        num_train_steps=3,
        mesh__num_devices=1,
    )
    config.model.kwargs = dict(num_layers=2, num_modules=2)
    result = train_and_evaluate(config, tmp_path)
    assert np.isfinite(result["train"]["loss"])
    assert 0.0 <= result["eval"]["module_0/accuracy"] <= 1.0


@pytest.fixture(scope="module")
def one_trainer_step(session_make_config):
    """schedule, compute dtype -> (params, metrics) after one trainer step (2 micro-batches)."""
    from effformer.train.experiment import build_experiment
    from effformer.train.steps import make_train_step

    @functools.cache
    def run(schedule: str, compute_dtype: str = "float32"):
        config = session_make_config(
            model__name="local_learning_vit",
            model__tiny=True,
            task__name="local_learning",
            task__local_schedule=schedule,
            # Smoothed targets are not bfloat16 numbers: the two schedules must both keep
            # them float32 for the loss (the sequential one rounded them).
            task__label_smoothing=0.1,
            grad_accum_steps=2,
            global_batch_size=8,
            compute_dtype=compute_dtype,
            mesh__num_devices=1,
        )
        config.model.kwargs = dict(num_modules=2, dropout_rate=0.3)
        exp = build_experiment(config)
        rng = np.random.default_rng(0)
        batch = {
            "inputs": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
        }
        state, metrics = make_train_step(exp)(exp.init_state(), batch)
        return jax.device_get(state.params), jax.device_get(metrics)

    return run


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_trainers_sequential_schedule_equals_the_joint_one(one_trainer_step, compute_dtype):
    joint_params, joint_metrics = one_trainer_step("joint", compute_dtype)
    params, metrics = one_trainer_step("sequential", compute_dtype)
    assert set(metrics) == set(joint_metrics)
    for name in ("loss", "module_0/reconstruction", "grad_norm"):
        np.testing.assert_allclose(metrics[name], joint_metrics[name], rtol=1e-5)
    if compute_dtype == "float32":  # the same float32 gradients: the same update
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(joint_params), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # In bfloat16 the two schedules are different XLA programs whose gradients differ by
    # roundings (their norms agree above); Adam's first update g / (|g| + eps) turns
    # that into visible differences where |g| is near eps, so parameters are compared
    # in float32 only.


def test_an_unknown_schedule_is_refused():
    config = _task().config.copy_and_resolve_references()
    config.local_schedule = "interleaved"
    with pytest.raises(
        ValueError, match=r"local_schedule must be one of \('joint', 'sequential'\)"
    ):
        create_task(config, INFO)


def _conv3x3_same(x, kernel, bias):
    """[B, H, W, Cin] (*) [3, 3, Cin, Cout] with zero padding 1: a float64 loop."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            window = padded[:, i : i + 3, j : j + 3, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel) + bias
    return out


def test_conv_decoder_maps_the_image_tokens_on_their_grid():
    decoder = FeatureDecoder("conv", hidden=5, grid=(2, 3), num_prefix_tokens=1)
    tokens = np.random.default_rng(2).normal(size=(2, 7, 4)).astype(np.float32)
    variables = decoder.init(jax.random.PRNGKey(0), tokens)
    out = jax.jit(decoder.apply)(variables, tokens)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])
    grid = tokens[:, 1:].astype(np.float64).reshape(2, 2, 3, 4)  # the class token is left out
    hidden = np.maximum(_conv3x3_same(grid, **params["hidden"]), 0.0)
    want = _conv3x3_same(hidden, **params["out"]).reshape(2, 6, 4)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
