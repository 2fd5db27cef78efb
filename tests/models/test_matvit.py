"""MatViT: MatFormer's nested FFN widths in the ViT family, and the summed classification loss.

References: a second model built with the smaller MLP width whose FFN weights
are the first ``w`` hidden units of the first (width ``w`` must compute it,
forward and gradients, float64); a full-width model whose FFN output rows
past each block's width are zero (per-block widths must compute it); losses
computed by hand in numpy.
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.models.vit import VisionTransformer
from effformer.train.tasks import create_task

HIDDEN = 16  # embed_dim 8 * mlp_ratio 2
VIT = dict(
    num_classes=5, image_size=8, num_channels=3, patch_size=4,
    embed_dim=8, num_layers=2, num_heads=2, mlp_ratio=2.0,
)  # fmt: skip
# CCT: conv tokenizer, SeqPool, CCT block ordering, no qkv bias.
CCT = dict(
    VIT, tokenizer="conv", conv_layers=1, conv_planes=4, pooling="seq_pool",
    block_ordering="cct", qkv_bias=False, norm_epsilon=1e-5,
)  # fmt: skip
IMAGES = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 3), jnp.float32)
LABELS = jnp.array([0, 3, 4], jnp.int32)


def _params(model):
    return jax.jit(model.init)(jax.random.PRNGKey(0), IMAGES)["params"]


def _float64(tree):
    return jax.tree.map(lambda p: p.astype(jnp.float64), tree)


def _first_units(params, widths):
    """Parameters of a model whose block i has MLP width widths[i]: the first units."""
    sliced = dict(params)
    for index, width in enumerate(widths):
        ffn = params[f"block_{index}"]["ffn"]
        fc1, fc2 = ffn["fc1"], ffn["fc2"]
        sliced[f"block_{index}"] = dict(
            params[f"block_{index}"],
            ffn={
                "fc1": {"kernel": fc1["kernel"][:, :width], "bias": fc1["bias"][:width]},
                "fc2": {"kernel": fc2["kernel"][:width], "bias": fc2["bias"]},
            },
        )
    return sliced


def test_no_width_is_the_same_program():
    """None, the full width as units and as 1.0, and a single granularity give the same bits."""
    model = VisionTransformer(**VIT)
    params = _params(model)

    @jax.jit
    def runs(params):
        run = lambda **kwargs: model.apply({"params": params}, IMAGES, **kwargs)
        return run(), run(ffn_widths=None), run(ffn_widths=HIDDEN), run(ffn_widths=(1.0, 1.0))

    plain, *others = runs(params)
    for other in others:
        np.testing.assert_array_equal(np.asarray(other), np.asarray(plain))
    # The same jaxpr as a call without the argument: None adds nothing to the program.
    no_arg = jax.make_jaxpr(lambda p: model.apply({"params": p}, IMAGES))(params)
    with_none = jax.make_jaxpr(lambda p: model.apply({"params": p}, IMAGES, ffn_widths=None))(
        params
    )
    assert str(no_arg) == str(with_none)


def test_width_is_the_smaller_model_with_sliced_weights(x64):
    """Width w (every block) == a model built with MLP width w holding the first w units;
    the gradients agree on those units and are zero on the rest. (ViT here, CCT below.)"""
    family, width = VIT, 4
    model = VisionTransformer(**family)
    small = VisionTransformer(**{**family, "mlp_ratio": width / family["embed_dim"]})
    assert small.ffn_hidden_dim == width
    params = _float64(_params(model))
    images = IMAGES.astype(jnp.float64)

    def loss(params, model, **kwargs):
        logits = model.apply({"params": params}, images, **kwargs)
        return jnp.sum(jnp.sin(logits)), logits

    grad = jax.grad(loss, has_aux=True)

    @jax.jit
    def both(params):
        small_params = _first_units(params, (width, width))
        full = model.apply({"params": params}, images)
        return grad(params, model, ffn_widths=width / HIDDEN), grad(small_params, small), full

    (grads, logits), (small_grads, small_logits), full = both(params)
    np.testing.assert_allclose(logits, small_logits, rtol=1e-12, atol=1e-12)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
        _first_units(grads, (width, width)),
        small_grads,
    )
    for index in range(family["num_layers"]):
        ffn = grads[f"block_{index}"]["ffn"]
        assert not np.any(ffn["fc1"]["kernel"][:, width:])
        assert not np.any(ffn["fc1"]["bias"][width:])
        assert not np.any(ffn["fc2"]["kernel"][width:])
    # The width changes the function: the test can fail.
    assert np.abs(full - logits).max() > 1e-6


def test_per_block_widths_and_granularities(x64):
    """Per-block widths == the full model with each block's FFN rows past its width zeroed;
    ffn_granularities stacks exactly the separate calls."""
    model = VisionTransformer(**CCT)
    params = _float64(_params(model))
    images = IMAGES.astype(jnp.float64)
    widths = (4, 12)
    zeroed = dict(params)
    for index, width in enumerate(widths):
        block = params[f"block_{index}"]
        fc2 = block["ffn"]["fc2"]
        kernel = fc2["kernel"].at[width:].set(0.0)
        zeroed[f"block_{index}"] = dict(block, ffn=dict(block["ffn"], fc2=dict(fc2, kernel=kernel)))
    run = lambda params, **kwargs: model.apply({"params": params}, images, **kwargs)

    @jax.jit
    def runs(params, zeroed):
        return (
            run(zeroed),
            run(params, ffn_widths=widths),
            run(params, ffn_widths=(0.25, 0.75)),
            run(params, ffn_granularities=(widths, 1.0)),
            run(params),
        )

    expected, per_block, fractions, stacked, full = runs(params, zeroed)
    np.testing.assert_allclose(per_block, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fractions, expected, rtol=1e-12, atol=1e-12)
    assert stacked.shape == (2, 3, CCT["num_classes"])
    np.testing.assert_allclose(stacked[0], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stacked[1], full, rtol=1e-12, atol=1e-12)
    assert np.abs(stacked[0] - stacked[1]).max() > 1e-6


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_summed_classification_loss_equals_the_separate_losses():
    granularities = (0.25, (4, HIDDEN))
    config = ml_collections.ConfigDict(
        dict(
            name="image_classification",
            matformer_widths=granularities,
            label_smoothing=0.0,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
        )
    )
    info = types.SimpleNamespace(num_classes=VIT["num_classes"], input_shape=(8, 8, 3))
    task = create_task(config, info)
    model = VisionTransformer(**VIT)
    params = _params(model)
    batch = task.prepare_batch(
        {"inputs": IMAGES, "label": LABELS}, jax.random.PRNGKey(2), train=True
    )

    def joint_loss(params):
        outputs = model.apply({"params": params}, **task.model_inputs(batch))
        loss_sum, weight, metrics = task.loss_and_metrics(outputs, batch)
        return loss_sum, (weight, metrics, outputs)

    def separate_loss(params, widths):
        logits = model.apply({"params": params}, IMAGES, ffn_widths=widths)
        return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(3), LABELS]), logits

    @jax.jit
    def everything(params):
        joint = jax.value_and_grad(joint_loss, has_aux=True)(params)
        grad = jax.grad(separate_loss, has_aux=True)
        return joint, [grad(params, widths) for widths in granularities]

    ((loss_sum, (weight, metrics, outputs)), grads), separate = everything(params)
    assert outputs.shape == (2, 3, VIT["num_classes"])
    total = 0.0
    for granularity, output, (_, logits) in zip(granularities, outputs, separate, strict=True):
        np.testing.assert_allclose(output, logits, rtol=1e-6, atol=1e-6)
        by_hand = -_log_softmax(logits)[np.arange(3), np.asarray(LABELS)].sum()
        correct = (np.asarray(logits).argmax(-1) == np.asarray(LABELS)).sum()
        label = "ffn_" + (
            "-".join(f"{w:g}" for w in granularity)
            if isinstance(granularity, tuple)
            else f"{granularity:g}"
        )
        np.testing.assert_allclose(metrics[f"{label}/loss"][0], by_hand, rtol=1e-5)
        np.testing.assert_allclose(metrics[f"{label}/accuracy"][0], correct)
        total += by_hand
    np.testing.assert_allclose(loss_sum, total, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"][0], total, rtol=1e-5)
    assert float(weight) == 3.0
    # The gradient is the sum of the granularities' gradients.
    summed = jax.tree.map(lambda *g: sum(g), *[g for g, _ in separate])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, summed)
    # Without matformer_widths the task is the plain classification task.
    plain = create_task(ml_collections.ConfigDict(dict(config, matformer_widths=())), info)
    assert plain.model_inputs(batch) == {"inputs": batch["inputs"]}
    with pytest.raises(ValueError, match=r"stacked over them, \[G=2, \.\.\.\], got shape"):
        task.loss_and_metrics(outputs[:1], batch)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ffn_widths=0), r"ffn_widths must be an int in \[1, ffn_hidden_dim=16\]"),
        (dict(ffn_widths=17), r"ffn_widths must be an int in \[1, ffn_hidden_dim=16\].*got 17"),
        (dict(ffn_widths=0.3), r"whole number; got 0.3"),
        (dict(ffn_widths=True), r"got True of type bool"),
        (dict(ffn_widths=(4, 8, 16)), r"num_layers=2 entries, got 3"),
        (dict(ffn_widths=(4, 0)), r"ffn_widths\[1\] must be"),
        (dict(ffn_granularities=(4, 99)), r"VisionTransformer: ffn_granularities\[1\]: ffn_widths"),
        (dict(ffn_granularities=(4, None)), r"ffn_granularities\[1\] is None"),
        (dict(ffn_granularities=()), r"non-empty sequence"),
        (dict(ffn_widths=4, ffn_granularities=(4,)), r"not both"),
    ],
)
def test_bad_widths_raise(kwargs, message):
    model = VisionTransformer(**VIT)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IMAGES, **kwargs))
