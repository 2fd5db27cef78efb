"""TinyFusion's depth pruning: N:M candidates, straight-through sampling, layer gates, pruning.

References: itertools' combinations, the softmax Jacobian written out in numpy
float64, a shallower model built from scratch with the kept layers' parameters
(what the export relies on), and LoRA's update as explicit sums over the rank.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from effformer import models
from effformer.models.tinyfusion import (
    TinyFusionLM,
    candidate_masks,
    check_layer_groups,
    gumbel_softmax_straight_through,
    init_lora,
    lora_input_axes,
    merge_lora,
    sample_layer_gates,
    select_layers,
)
from effformer.train.depth_pruning import prune_lm_params, pruned_model_kwargs
from effformer.train.tasks import create_task

TINY = dict(vocab_size=16, embed_dim=8, num_heads=2, num_kv_heads=2, ffn_hidden_dim=16)
TOKENS = jnp.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 15, 0, 6]], jnp.int32)
# Mixed mixers, so the pruned model's layer pattern must follow the kept layers.
PATTERN = "global,local:3"


def _decoder(num_layers=4, **overrides):
    return models.create("lm_decoder", tiny=True, **{**TINY, "num_layers": num_layers, **overrides})


def _float64(tree):
    return jax.tree.map(lambda p: p.astype(jnp.float64), tree)


def _random_params(model, seed=0, dtype=jnp.float32):
    """Random parameters of ``model``'s shapes (no compiled init: tests run tiny shapes)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), dtype), shapes)


# ------------------------------------------------------------------ candidates and sampling


@pytest.mark.parametrize("keep, group_size", [(1, 2), (2, 4), (3, 5)])
def test_candidate_masks_enumerate_every_choice(keep, group_size):
    masks = candidate_masks(keep, group_size)
    assert masks.shape == (math.comb(group_size, keep), group_size)
    assert set(np.unique(masks)) == {0.0, 1.0}
    np.testing.assert_array_equal(masks.sum(1), keep)
    kept = [tuple(np.flatnonzero(row)) for row in masks]
    assert kept == list(itertools.combinations(range(group_size), keep))


def test_straight_through_sample_is_one_hot_with_the_softmax_gradient(x64):
    key, temperature = jax.random.PRNGKey(3), 0.7
    logits = jax.random.normal(jax.random.PRNGKey(0), (5, 6), jnp.float64)
    cotangent = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (5, 6), jnp.float64))

    @jax.jit
    def sample_and_grad(logits, cotangent):
        sample, vjp = jax.vjp(
            lambda z: gumbel_softmax_straight_through(key, z, temperature), logits
        )
        return sample, vjp(cotangent)[0]

    sample, grad = sample_and_grad(logits, jnp.asarray(cotangent))

    noise = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float64))
    perturbed = np.asarray(logits) + noise
    expected = np.eye(6)[perturbed.argmax(-1)]
    np.testing.assert_array_equal(np.asarray(sample), expected)  # exactly one-hot
    # Gradient of softmax(y / t): J = (diag(s) - s s^T) / t, so J^T v = s * (v - s.v) / t.
    soft = np.exp(perturbed / temperature)
    soft /= soft.sum(-1, keepdims=True)
    dot = (soft * cotangent).sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, soft * (cotangent - dot) / temperature, rtol=1e-12)


def test_bfloat16_logits_are_sampled_with_float32_noise():
    # Regression: bfloat16 logits drew bfloat16 Gumbel noise, which ties in ~2% of draws
    # (argmax then takes the first candidate) and skews the choice. The sample must be
    # the float32 one, returned in the logits' dtype.
    logits = jnp.zeros((400, 6), jnp.bfloat16)
    key = jax.random.PRNGKey(7)
    sample = gumbel_softmax_straight_through(key, logits, 1.0)
    assert sample.dtype == jnp.bfloat16
    want = gumbel_softmax_straight_through(key, logits.astype(jnp.float32), 1.0)
    np.testing.assert_array_equal(np.asarray(sample, np.float32), np.asarray(want))


def test_sampled_gates_are_the_chosen_candidates():
    candidates = candidate_masks(2, 4)
    logits = jnp.zeros((2, len(candidates))).at[0, 5].set(50.0).at[1, 0].set(50.0)

    @jax.jit
    def sample(logits):
        key = jax.random.PRNGKey(0)
        per_step = sample_layer_gates(key, logits, candidates, 1.0)
        per_example = sample_layer_gates(key, logits, candidates, 1.0, 3)
        return per_step, per_example, sample_layer_gates(key, 0 * logits, candidates, 1.0, 64)

    per_step, per_example, uniform = sample(logits)
    expected = np.array([0, 0, 1, 1, 1, 1, 0, 0], np.float32)  # candidates (2, 3) and (0, 1)
    np.testing.assert_array_equal(per_step, expected)
    np.testing.assert_array_equal(per_example, np.tile(expected, (3, 1)))
    assert select_layers(logits, 2, 4) == (2, 3, 4, 5)
    # Equal logits: every example draws its own 2:4 mask.
    np.testing.assert_array_equal(np.asarray(uniform).reshape(64, 2, 4).sum(-1), 2.0)
    assert len({tuple(row) for row in np.asarray(uniform)}) > 10


# ------------------------------------------------------------------ gates and pruned models


def test_gates_select_layers_exactly(x64):
    """Gates of 1 are the model without gates, to the bit. Gates of 0 compute the shallower
    model holding the kept layers' parameters (the property the export relies on);
    per-example gates prune each row on its own."""
    model = _decoder(num_layers=3, layer_pattern=PATTERN)
    params = _random_params(model, dtype=jnp.float64)
    keeps = [(0, 2), (1, 2)]
    gates = np.zeros((2, 3))
    for row, keep in enumerate(keeps):
        gates[row, list(keep)] = 1.0
    shallow = [model.clone(**pruned_model_kwargs(model, keep)) for keep in keeps]
    assert [m.layer_pattern for m in shallow] == ["global", ["local:3", "global"]]

    @jax.jit
    def outputs(params, gates):
        run = lambda **kwargs: model.apply({"params": params}, TOKENS, **kwargs)
        pruned = [
            small.apply({"params": prune_lm_params(params, keep)}, TOKENS)
            for small, keep in zip(shallow, keeps, strict=True)
        ]
        return run(), run(layer_gates=jnp.ones(3)), run(layer_gates=gates), pruned

    full, ones, per_example, pruned = outputs(params, jnp.asarray(gates))
    np.testing.assert_array_equal(np.asarray(ones), np.asarray(full))
    for row in range(2):
        np.testing.assert_allclose(per_example[row], pruned[row][row], rtol=1e-12, atol=1e-12)
    assert np.abs(np.asarray(full) - np.asarray(pruned[0])).max() > 1e-3  # the layer mattered


def test_bad_schemes_and_gates_are_refused():
    for args, message in [
        ((8, 0, 4), "keep must be a positive int, got 0"),
        ((8, 4, 4), "keep \\(N\\) must be smaller than group_size \\(M\\).*keep=4"),
        ((6, 2, 4), "group_size \\(M\\) must divide num_layers=6.*group_size=4"),
        ((8, True, 4), "keep must be a positive int, got True"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_layer_groups(*args)
    with pytest.raises(ValueError, match="must divide num_layers=6"):
        models.create("tinyfusion_lm", tiny=True, num_layers=6, keep=2, group_size=4)
    with pytest.raises(ValueError, match="must be pre-norm.*'post_norm'"):
        models.create("tinyfusion_lm", tiny=True, ordering="post_norm")
    with pytest.raises(ValueError, match="weight_update must be one of.*'lowrank'"):
        models.create("tinyfusion_lm", tiny=True, weight_update="lowrank")
    model = _decoder()
    with pytest.raises(
        ValueError, match=r"layer_gates must be floats of shape.*\(4,\).*\(2, 4\).*got shape \(3,\)"
    ):
        model.init(jax.random.PRNGKey(0), TOKENS, layer_gates=jnp.ones(3))
    with pytest.raises(ValueError, match="layer_gates needs ordering='pre_norm'"):
        _decoder(ordering="post_norm").init(jax.random.PRNGKey(0), TOKENS, layer_gates=jnp.ones(4))
    params = {"decoder": {"layer_0": {}, "layer_1": {}, "final_norm": {}}}
    for keep in [(1, 0), (0, 2), (), (0, 0)]:
        with pytest.raises(ValueError, match=r"strictly increasing layer indices in \[0, 2\)"):
            prune_lm_params(params, keep)
    with pytest.raises(ValueError, match="hold a TinyFusion search"):
        prune_lm_params({**params, "tinyfusion": {}}, (0,))


# ------------------------------------------------------------------ LoRA and the search


def test_lora_merge_is_the_low_rank_update(x64):
    dim, rank, scale = 8, 2, 1.5
    params = {
        "query": {"kernel": jnp.ones((dim, 2, 4)), "bias": jnp.ones((2, 4))},
        "out": {"kernel": jnp.ones((2, 4, dim))},
        "fc2": {"kernel": jnp.ones((16, dim))},
        "conv1d": {"kernel": jnp.ones((4, 1, dim))},
    }
    assert [lora_input_axes(params[n]["kernel"].shape, dim) for n in ("query", "out", "fc2")] == [
        1, 2, 1,
    ]  # fmt: skip
    lora = init_lora(jax.random.PRNGKey(0), _float64(params), rank, dim)
    assert sorted(lora) == ["fc2", "out", "query"]  # no conv, no bias
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), lora)  # B != 0
    merged = merge_lora(_float64(params), lora, scale)
    for name in ("query", "out", "fc2"):
        kernel = np.asarray(params[name]["kernel"], np.float64)
        a, b = np.asarray(lora[name]["kernel"]["a"]), np.asarray(lora[name]["kernel"]["b"])
        inputs = math.prod(kernel.shape[: lora_input_axes(kernel.shape, dim)])
        delta = np.zeros((inputs, b.shape[1]))
        for i in range(inputs):
            for o in range(b.shape[1]):
                delta[i, o] = sum(a[i, r] * b[r, o] for r in range(rank))
        expected = kernel + scale * delta.reshape(kernel.shape)
        np.testing.assert_allclose(merged[name]["kernel"], expected, rtol=1e-12)
    np.testing.assert_array_equal(merged["conv1d"]["kernel"], params["conv1d"]["kernel"])
    np.testing.assert_array_equal(merged["query"]["bias"], params["query"]["bias"])


def test_training_steps_update_the_mask_logits_and_lora_only():
    """Two Adam steps of the causal-LM loss through the task: the logits and LoRA factors
    move, the dense weights get no gradient; evaluation runs the selected layers."""
    search = models.create("tinyfusion_lm", tiny=True, num_layers=2, **TINY)  # one 1:2 group
    assert isinstance(search, TinyFusionLM) and search.weight_update == "lora"
    task = create_task(ml_collections.ConfigDict({"name": "causal_lm"}), None)
    batch = {"inputs": TOKENS}
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    shapes = jax.eval_shape(search.init, rngs, TOKENS)["params"]
    dense = _random_params(search.lm)  # the LM's parameters, unchanged and at the same paths
    assert jax.tree.structure({k: v for k, v in shapes.items() if k != "tinyfusion"}) == (
        jax.tree.structure(dense)
    )
    params = {
        **dense,
        "tinyfusion": {
            "gate_logits": jnp.zeros(shapes["tinyfusion"]["gate_logits"].shape),
            "lora": init_lora(jax.random.PRNGKey(2), dense, search.lora_rank, TINY["embed_dim"]),
        },
    }
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    tx = optax.adam(0.05)

    def loss(params, key):
        outputs = search.apply(
            {"params": params}, **task.model_inputs(batch), train=True,
            rngs={"dropout": key}, gumbel_temperature=2.0,
        )  # fmt: skip
        loss_sum, weight, _ = task.loss_and_metrics(outputs, batch)
        return loss_sum / weight

    @jax.jit
    def step(params, opt_state, key):
        grads = jax.grad(loss)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    new, opt_state = params, tx.init(params)
    for index in range(2):
        new, opt_state, grads = step(new, opt_state, jax.random.PRNGKey(10 + index))
        dense_grads = {k: v for k, v in grads.items() if k != "tinyfusion"}
        assert all(not np.asarray(g).any() for g in jax.tree.leaves(dense_grads))
    before, after = params["tinyfusion"], new["tinyfusion"]
    assert np.abs(after["gate_logits"] - before["gate_logits"]).max() > 0.01
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(after["lora"]))
    for old_leaf, new_leaf in zip(
        jax.tree.leaves(dense), jax.tree.leaves({k: new[k] for k in dense}), strict=True
    ):
        np.testing.assert_array_equal(old_leaf, new_leaf)

    # Evaluation runs the most probable candidate of each group, with the weight update.
    gates = np.zeros(2, np.float32)
    gates[list(search.selected_layers(new))] = 1.0

    @jax.jit
    def evaluation(params, gates):
        lm_params = search.language_model_params(params)
        expected = search.lm.apply({"params": lm_params}, TOKENS, layer_gates=gates)
        return search.apply({"params": params}, TOKENS), expected

    got, expected = evaluation(new, jnp.asarray(gates))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_layer_gate_losses_refuses_a_matformer_task():
    # Its outputs are stacked over the granularities and the loss is their sum, so the
    # "mean loss" would be G times the one-width loss.
    import types

    from effformer.train.depth_pruning import layer_gate_losses

    config = ml_collections.ConfigDict(dict(name="causal_lm", matformer_widths=(0.5, 1.0)))
    info = types.SimpleNamespace(vocab_size=16)
    exp = types.SimpleNamespace(model=_decoder(), task=create_task(config, info))
    with pytest.raises(ValueError, match=r"one width .*got matformer_widths=\(0.5, 1.0\)"):
        layer_gate_losses(exp, {}, np.ones((1, 4)), "test")
