"""IA-RED² (effformer.reducers.ia_red): the interpreter against its equation, decisions,
masking against running on the kept tokens only, REINFORCE against a hand-made gradient,
the frozen backbone, bad settings."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer.models.vit import VisionTransformer
from effformer.nn.block import ResidualBlock
from effformer.ops.masks import AttentionMask
from effformer.reducers import ia_red
from effformer.train.config import default_config
from effformer.train.ia_red_task import IaRedPolicyTask
from effformer.train.optim import create_optimizer

# ------------------------------------------------------------------ slow references


def _layer_norm(v: np.ndarray, epsilon: float = 1e-5) -> np.ndarray:
    return (v - v.mean()) / np.sqrt(v.var() + epsilon)


def _interpreter_loop(params, x, alive, heads, protected):
    """p_j = (1/H) sum_h sigmoid(q_h . k_hj / sqrt(d_h)), token by token and head by head."""
    wq, bq = np.asarray(params["query"]["kernel"]), np.asarray(params["query"]["bias"])
    wk, bk = np.asarray(params["key"]["kernel"]), np.asarray(params["key"]["bias"])
    batch, n, dim = x.shape
    dh = dim // heads
    out = np.zeros((batch, n - protected))
    for b in range(batch):
        h = [_layer_norm(np.asarray(x[b, j]) * alive[b, j]) for j in range(n)]
        live = [j for j in range(n) if alive[b, j]]
        summary = h[0] if protected else sum(h[j] for j in live) / len(live)
        q = summary @ wq + bq
        for j in range(protected, n):
            if not alive[b, j]:
                continue
            k = h[j] @ wk + bk
            total = 0.0
            for head in range(heads):
                part = slice(head * dh, (head + 1) * dh)
                total += 1.0 / (1.0 + np.exp(-(q[part] @ k[part]) / np.sqrt(dh)))
            out[b, j - protected] = total / heads
    return out


def _log_prob_loop(probs, decisions, alive):
    out = np.zeros(probs.shape[0])
    for b in range(probs.shape[0]):
        for j in range(probs.shape[1]):
            if alive[b, j]:
                p = probs[b, j]
                out[b] += np.log(p) if decisions[b, j] else np.log(1.0 - p)
    return out


# ------------------------------------------------------------------ helpers

BASE = dict(num_classes=3, image_size=8, patch_size=2, embed_dim=8, num_layers=2, num_heads=2)


def _vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**(BASE | kwargs))


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """float64 N(0, 1) from numpy (no compilation, unlike jax.random outside jit)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _random_params(module, *args, key=0, interpreter_scale=1.0, **kwargs):
    """float64 N(0, 0.5^2) parameters of ``module`` (shapes from an abstract init), the
    interpreters' scaled so their probabilities spread well away from 0.5 and decisions
    do not hinge on rounding."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes["params"])
    values = []
    for i, (path, leaf) in enumerate(leaves):
        scale = interpreter_scale if "ia_red" in jax.tree_util.keystr(path) else 1.0
        values.append(0.5 * scale * _normal(1000 * key + i, leaf.shape))
    return jax.tree_util.tree_unflatten(treedef, values)


def _images(key=0):
    return _normal(key, (4, 8, 8, 3))


# ------------------------------------------------------------------ the interpreter


def test_interpreter_matches_equation_and_ignores_dead_tokens(x64):
    x = _normal(0, (3, 7, 8))
    alive = jnp.array(np.random.default_rng(0).random((3, 7)) > 0.3).at[:, 0].set(True)
    interpreter = ia_red.MultiHeadInterpreter(num_heads=2, param_dtype=jnp.float64)
    for protected in (0, 1):
        params = _random_params(interpreter, x, alive, interpreter_scale=4.0)
        apply = jax.jit(
            lambda x, a, p=params, k=protected: interpreter.apply(
                {"params": p}, x, a, num_protected=k
            )
        )
        probs = apply(x, alive)
        assert probs.shape == (3, 7 - protected) and probs.dtype == jnp.float64
        want = _interpreter_loop(params, np.asarray(x), np.asarray(alive), 2, protected)
        np.testing.assert_allclose(np.asarray(probs), want, rtol=1e-12, atol=1e-14)
        assert bool(jnp.all(jnp.where(alive[:, protected:], probs > 0, probs == 0)))
        # A dead token's value changes no live token's score, bit for bit.
        noise = 1e3 * _normal(2, x.shape)
        noisy = jnp.where(alive[..., None], x, noise)
        np.testing.assert_array_equal(np.asarray(apply(noisy, alive)), np.asarray(probs))


def test_decisions_log_prob_and_top_k(x64):
    probs = jnp.array([[0.9, 0.2, 0.51, 0.7, 0.05], [0.4, 0.6, 0.6, 0.1, 0.99]], jnp.float64)
    alive = jnp.array([[True, True, True, False, True], [True, True, True, True, True]])
    kept = ia_red.threshold_decisions(probs, alive)
    np.testing.assert_array_equal(
        np.asarray(kept), [[True, False, True, False, False], [False, True, True, False, True]]
    )
    sampled = ia_red.sample_decisions(jax.random.PRNGKey(0), probs, alive)
    assert not bool(jnp.any(sampled & ~alive))  # a dropped token is never revived
    for decisions in (kept, sampled):
        got = ia_red.decision_log_prob(probs, decisions, alive)
        want = _log_prob_loop(np.asarray(probs), np.asarray(decisions), np.asarray(alive))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13)
    # Top-k keeps the protected token, then the k best patch tokens in their order.
    keep = ia_red.top_k_keep(probs, 2, num_protected=1)
    np.testing.assert_array_equal(np.asarray(keep), [[0, 1, 4], [0, 2, 5]])
    # Rewards and the leave-one-out baseline, by hand.
    rewards = ia_red.policy_reward(jnp.array([True, False, True]), jnp.array([0.5, 0.2, 1.0]), 2.0)
    np.testing.assert_allclose(np.asarray(rewards), [0.75, -2.0, 0.0])
    baseline = ia_red.leave_one_out_baseline(rewards, jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(baseline), [-2.0, 0.75, -0.625])


def test_masked_tokens_do_not_reach_kept_tokens_in_a_block(x64):
    x = _normal(3, (2, 6, 8))
    alive = jnp.array([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 1]], jnp.int32)
    block = ResidualBlock(
        mixer="attention", mixer_kwargs=dict(num_heads=2), ffn="gelu", ffn_hidden_dim=8
    )
    mask = AttentionMask(q_segment_ids=alive, kv_segment_ids=alive)
    params = _random_params(block, x, mask=mask)
    apply = jax.jit(lambda x: block.apply({"params": params}, x, mask=mask))
    noisy = jnp.where(alive[..., None] > 0, x, -50.0 * x + 7.0)
    out, out_noisy = apply(x), apply(noisy)
    live = np.asarray(alive) > 0
    np.testing.assert_array_equal(np.asarray(out)[live], np.asarray(out_noisy)[live])


# ------------------------------------------------------------------ the model


def _run(model, params, images, **kwargs):
    """Jitted apply returning (output, intermediates)."""
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"], **kwargs))
    output, state = apply(params, images)
    return output, state["intermediates"]


def _set_interpreters(params, query_bias: float, key_bias: float) -> dict:
    """Interpreters whose every probability is sigmoid(8 * q_bias * k_bias / 2): constant."""
    params = dict(params)
    for name in ("ia_red_interpreter_0", "ia_red_interpreter_1"):
        params[name] = jax.tree.map(np.zeros_like, params[name])
        params[name]["query"]["bias"] = np.full((8,), query_bias)
        params[name]["key"]["bias"] = np.full((8,), key_bias)
    return params


def test_masking_is_exact_and_off_is_unchanged(x64):
    # CCT-like: SeqPool, no class token (the interpreter's query is the live tokens' mean).
    model = _vit(pooling="seq_pool", ia_red_stages=(0, 1))
    images = _images()
    image = images[:1]  # one image: top-k can then keep exactly its thresholded tokens
    params = _random_params(model, image, interpreter_scale=6.0)
    masked = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
    logits, state = masked(params, image)
    kept = state["intermediates"]["ia_red_kept"]
    counts = tuple(int(k.sum()) for k in kept)
    assert 0 < counts[1] < counts[0] < 16, counts  # both stages drop some, not all
    assert not bool(jnp.any(kept[1] & ~kept[0]))  # hierarchical: dropped stays dropped
    # The same tokens gathered (top-k with the thresholded counts): the same logits.
    top_k = model.clone(ia_red_top_k=counts)
    gathered, gathered_state = jax.jit(
        lambda p, x: top_k.apply({"params": p}, x, mutable=["intermediates"])
    )(params, image)
    for a, b in zip(kept, gathered_state["intermediates"]["ia_red_kept"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The backbone's norms compute in float32, so the two programs agree to its rounding.
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(logits), rtol=1e-5, atol=1e-6)
    # The heat maps: every patch scored at stage 0, only the survivors at stage 1.
    heat = state["intermediates"]["ia_red_keep_probs"]
    assert heat[0].shape == (1, 16) and bool(jnp.all((heat[0] > 0) & (heat[0] < 1)))
    assert bool(jnp.all(jnp.where(kept[0], heat[1] > 0, heat[1] == 0)))

    # Every token dropped: nothing of the image is left, the logits are the head's bias.
    drop_all = _set_interpreters(params, -4.0, 4.0)
    for x in (image, -3.0 * image):
        logits, state = masked(drop_all, x)
        assert not bool(jnp.any(state["intermediates"]["ia_red_kept"][0]))
        np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(params["head"]["bias"]))
    # Every token kept: the model without reduction (to the float32 norms' rounding).
    plain = _vit(pooling="seq_pool")
    backbone = {k: v for k, v in params.items() if not k.startswith("ia_red")}
    assert jax.tree.structure(backbone) == jax.tree.structure(_random_params(plain, image))
    want = jax.jit(lambda p: plain.apply({"params": p}, image))(backbone)
    keep_all, _ = masked(_set_interpreters(params, 4.0, 4.0), image)
    np.testing.assert_allclose(np.asarray(keep_all), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Without interpreters: the same program as before the option, no new parameters.
    off = plain.clone(ia_red_stages=(), ia_red_top_k=())
    same = jax.jit(lambda p: off.apply({"params": p}, image))(backbone)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(want))


# ------------------------------------------------------------------ policy training


def _task(**fields) -> IaRedPolicyTask:
    config = ml_collections.ConfigDict(
        dict(name="ia_red_policy", label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    )
    config.update(fields)
    info = types.SimpleNamespace(num_classes=3, input_shape=(8, 8, 3))
    return IaRedPolicyTask(config, info)


def test_reinforce_gradient_matches_hand_reference_and_freezes_backbone(x64):
    model = _vit(ia_red_stages=(0, 1))
    images = _images(5)
    params = _random_params(model, images, key=5, interpreter_scale=0.3)
    rng = {"dropout": jax.random.PRNGKey(11)}
    task = _task(ia_red_error_penalty=0.7)

    def loss(p, labels):
        (logits, policy), state = model.apply(
            {"params": p},
            images,
            train=True,
            return_ia_red_policy=True,
            rngs=rng,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        loss_sum, _, _ = task.loss_and_metrics((logits, policy), {"label": labels})
        return loss_sum, (logits, policy, state["intermediates"])

    step = jax.jit(jax.grad(loss, has_aux=True))
    _, (logits, _, _) = step(params, jnp.zeros(4, jnp.int32))
    predictions = np.asarray(jnp.argmax(logits, -1))
    labels = jnp.asarray((predictions + np.array([0, 1, 0, 2])) % 3)  # two right, two wrong
    grads, (logits, policy, found) = step(params, labels)
    x0, x1 = found["Dropout_0"]["__call__"][0], found["block_0"]["__call__"][0]
    u0, u1 = (np.asarray(k) for k in found["ia_red_kept"])
    assert 0 < u0.sum() < u0.size and 0 < u1.sum() < u0.sum()

    # By hand: rewards, leave-one-out baseline, and per-image gradients of log pi.
    kept = (u0.mean(-1) + u1.mean(-1)) / 2  # blocks 0 and 1 run after stages 0 and 1
    correct = predictions == np.asarray(labels)
    np.testing.assert_allclose(np.asarray(policy["kept_fraction"]), kept, rtol=1e-14)
    rewards = np.where(correct, 1.0 - kept**2, -0.7)
    baseline = np.array([(rewards.sum() - r) / 3 for r in rewards])
    stages = [
        (x0, jnp.ones((4, 17), bool), jnp.asarray(u0)),
        (x1, jnp.asarray(np.c_[np.ones(4, bool), u0]), jnp.asarray(u1)),
    ]

    def log_pi(interpreters, b):
        total = 0.0
        for stage, (x, alive, u) in enumerate(stages):
            w = interpreters[stage]
            h = x[b] * alive[b][:, None]
            h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
            q = h[0] @ w["query"]["kernel"] + w["query"]["bias"]  # the class token's query
            k = h[1:] @ w["key"]["kernel"] + w["key"]["bias"]
            p = sum(jax.nn.sigmoid(k[:, s] @ q[s] / 2.0) for s in (slice(0, 4), slice(4, 8))) / 2
            terms = jnp.where(u[b], jnp.log(p), jnp.log(1.0 - p))
            total = total + jnp.sum(jnp.where(alive[b][1:], terms, 0.0))
        return total

    interpreters = [params["ia_red_interpreter_0"], params["ia_red_interpreter_1"]]
    per_image = jax.jit(jax.grad(log_pi))
    want = jax.tree.map(np.zeros_like, interpreters)
    for b in range(4):
        scale = -(rewards[b] - baseline[b])
        grad_b = jax.tree.map(np.asarray, per_image(interpreters, b))
        want = jax.tree.map(lambda acc, g, s=scale: acc + s * g, want, grad_b)
    for stage in (0, 1):
        got = grads[f"ia_red_interpreter_{stage}"]
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want[stage]), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-12)
    # The policy loss gives the backbone no gradient at all.
    for name, tree in grads.items():
        if not name.startswith("ia_red"):
            assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(tree)), name

    # One optimizer step with weight decay and a gradient of 1 added everywhere: the
    # backbone's update is exactly zero (it stays put bit for bit), the interpreters move.
    config = default_config().optimizer
    config.update(learning_rate=0.1, weight_decay=0.5, schedule="constant")
    noisy = jax.tree.map(lambda g: np.asarray(g) + 1.0, grads)
    config.trainable_modules = "ia_red_*"
    tx, _ = create_optimizer(config, num_train_steps=10)
    updates, _ = jax.jit(tx.update)(noisy, tx.init(params), params)
    for name, tree in updates.items():
        moved = any(np.any(np.asarray(u)) for u in jax.tree.leaves(tree))
        assert moved == name.startswith("ia_red"), name


def test_bad_settings_are_refused():
    for kwargs, message in [
        (dict(ia_red_stages=(1, 0)), "strictly ascending"),
        (dict(ia_red_stages=(0, 2)), r"stages\[1\]=2 is not a block"),
        (dict(ia_red_stages=(0,), ia_red_top_k=(17,)), r"top_k\[0\]=17 is more than the 16"),
        (dict(ia_red_stages=(0, 1), ia_red_top_k=(4, 6)), r"top_k\[1\]=6 is more than the 4"),
        (dict(ia_red_stages=(0, 1), ia_red_top_k=(4,)), "one count per stage"),
        (dict(ia_red_top_k=(4,)), "needs ia_red_stages"),
        (dict(ia_red_stages=(0,), tome_r=1), "cannot be combined"),
        (dict(ia_red_stages=(0,), ia_red_heads=3), "ia_red_heads must divide embed_dim=8"),
    ]:
        with pytest.raises(ValueError, match=message):
            _vit(**kwargs).check_config()
    x = jnp.zeros((1, 8, 8, 3))
    init = lambda model: jax.eval_shape(  # noqa: E731  (traced, not compiled)
        lambda: model.init(jax.random.PRNGKey(0), x, return_ia_red_policy=True)
    )
    with pytest.raises(ValueError, match="return_ia_red_policy=True needs ia_red_stages"):
        init(_vit())
    with pytest.raises(ValueError, match="top-k mode"):
        init(_vit(ia_red_stages=(0,), ia_red_top_k=(3,)))
    with pytest.raises(ValueError, match="ia_red_error_penalty .* must be >= 0, got -1"):
        _task(ia_red_error_penalty=-1.0)
    with pytest.raises(ValueError, match="ia_red_baseline must be one of"):
        _task(ia_red_baseline="greedy")
    # Mixup/CutMix and label smoothing were silently not applied.
    with pytest.raises(ValueError, match=r"config.task.mixup_alpha must be 0, got 0.8"):
        _task(mixup_alpha=0.8)
    with pytest.raises(ValueError, match=r"config.task.cutmix_alpha must be 0, got 1.0"):
        _task(cutmix_alpha=1.0)
    with pytest.raises(ValueError, match=r"config.task.label_smoothing must be 0, got 0.1"):
        _task(label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs a model with IA-RED"):
        _task().loss_and_metrics(jnp.zeros((2, 3)), {"label": jnp.zeros(2, jnp.int32)})
    config = default_config().optimizer
    config.trainable_modules = "interpreter"
    tx, _ = create_optimizer(config, num_train_steps=10)
    with pytest.raises(ValueError, match="'interpreter' matches no top-level module"):
        tx.init({"block_0": jnp.ones(2), "ia_red_interpreter_0": jnp.ones(2)})
