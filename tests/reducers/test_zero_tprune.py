"""Zero-TPrune (effformer.reducers.zero_tprune): WPR, the I- and S-stages, the ViT option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.mixers import MultiHeadAttention
from effformer.models.vit import VisionTransformer
from effformer.nn.block import ResidualBlock
from effformer.nn.ffn import make_ffn
from effformer.nn.norms import make_norm
from effformer.ops.masks import AttentionMask
from effformer.reducers.zero_tprune import (
    gather_tokens,
    importance_stage,
    prune_schedule,
    similarity_stage,
    token_importance,
    weighted_page_rank,
    wpr_iterations,
    zero_tprune,
)


def _attention(key, batch, heads, n, dtype=jnp.float64):
    logits = 2.0 * jax.random.normal(key, (batch, heads, n, n), dtype)
    return jax.nn.softmax(logits, axis=-1)


# ------------------------------------------------------------------ slow references


def _wpr_loop(attention: np.ndarray, iterations: int) -> np.ndarray:
    """s_new[j] = sum_i A[i, j] s[i], written as loops over every index."""
    batch, heads, n, _ = attention.shape
    out = np.zeros((batch, heads, n))
    for b in range(batch):
        for h in range(heads):
            s = [1.0 / n] * n
            for _ in range(iterations):
                s = [sum(attention[b, h, i, j] * s[i] for i in range(n)) for j in range(n)]
            out[b, h] = s
    return out


def _similarity_loop(metric, importance, k, protected):
    """The S-stage token by token: rank, split, best partner, drop the k most similar."""
    n = len(importance)
    rest = list(range(protected, n))
    # Descending importance; equal scores: lower index first.
    ranking = sorted(rest, key=lambda i: (-importance[i], i))
    num_b = len(rest) - len(rest) // 2
    b_set, a_list = ranking[:num_b], ranking[num_b:]
    unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    best = [max(float(unit[a] @ unit[b]) for b in b_set) for a in a_list]
    # Drop the highest best similarity; equal: the later (less important) A token first.
    order = sorted(range(len(a_list)), key=lambda t: (-best[t], -t))
    dropped = {a_list[t] for t in order[:k]}
    return [i for i in range(n) if i not in dropped]


# ------------------------------------------------------------------ weighted page rank


def test_wpr_matches_loop_reference_float64(x64):
    attention = _attention(jax.random.PRNGKey(0), 2, 3, 6)
    for iterations in (1, 4):
        got = weighted_page_rank(attention, iterations)
        assert got.dtype == jnp.float64
        want = _wpr_loop(np.asarray(attention), iterations)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)


def test_wpr_properties_from_the_paper(x64):
    n = 5
    # One token (2) receives all attention: it gets the top score (here all of it).
    sink = jnp.zeros((1, 1, n, n), jnp.float64).at[..., 2].set(1.0)
    scores = weighted_page_rank(sink, 3)[0, 0]
    assert int(jnp.argmax(scores)) == 2 and float(scores[2]) == pytest.approx(1.0)
    # A doubly-stochastic uniform graph: uniform scores.
    uniform = jnp.full((1, 2, n, n), 1.0 / n, jnp.float64)
    np.testing.assert_allclose(np.asarray(weighted_page_rank(uniform, 7)), 1.0 / n, rtol=1e-14)
    # Many iterations reach the fixed point s = A^T s, and the scores sum to 1 throughout.
    # Half uniform attention makes the power iteration contract by 1/2 per step (a random
    # softmax graph alone can converge slowly, as the paper notes for flat early layers).
    attention = 0.5 * _attention(jax.random.PRNGKey(1), 2, 2, 7) + 0.5 / 7
    s = weighted_page_rank(attention, 200)
    np.testing.assert_allclose(np.asarray(s.sum(-1)), 1.0, rtol=1e-12)
    fixed = jnp.einsum("bhij,bhi->bhj", attention, s)
    np.testing.assert_allclose(np.asarray(fixed), np.asarray(s), atol=1e-12)


def test_head_aggregation_is_root_mean_square(x64):
    attention = _attention(jax.random.PRNGKey(2), 1, 3, 5)
    per_head = np.asarray(weighted_page_rank(attention, 5))
    want = np.sqrt((per_head**2).mean(axis=1))
    np.testing.assert_allclose(np.asarray(token_importance(attention, 5)), want, rtol=1e-12)


def test_wpr_iteration_schedule():
    assert [wpr_iterations(i, 12) for i in range(12)] == [30] * 3 + [5] * 6 + [1] * 3
    assert [wpr_iterations(i, 4) for i in range(4)] == [30, 30, 30, 1]


# ------------------------------------------------------------------ stages


def test_importance_stage_keeps_the_most_important():
    importance = jnp.array([[0.9, 0.1, 0.5, 0.3, 0.5, 0.05], [0.0, 0.2, 0.1, 0.4, 0.3, 0.25]])
    keep = importance_stage(importance, 3, num_protected=1)
    # Row 0: protected 0, then the 2 best of the rest: 0.5 at 2 and 4 (tie with nothing).
    # Row 1: protected 0 (least important, kept anyway), then 3 and 4.
    np.testing.assert_array_equal(np.asarray(keep), [[0, 2, 4], [0, 3, 4]])
    # Ties: the lower index is kept.
    tied = importance_stage(jnp.array([[0.2, 0.2, 0.2, 0.1]]), 2)
    np.testing.assert_array_equal(np.asarray(tied), [[0, 1]])


@pytest.mark.parametrize("protected", [0, 1])
def test_similarity_stage_matches_loop_reference(x64, protected):
    key_m, key_i = jax.random.split(jax.random.PRNGKey(3))
    n = 9
    metric = jax.random.normal(key_m, (3, n, 4), jnp.float64)
    # Exact ties in both the importance (partition) and the similarity (a duplicated token).
    metric = metric.at[:, 5].set(metric[:, 2]).at[:, 7].set(metric[:, 2])
    importance = jnp.round(jax.random.uniform(key_i, (3, n), jnp.float64), 1)
    for k in (0, 1, 3, (n - protected) // 2):
        keep = similarity_stage(metric, importance, k, num_protected=protected)
        for b in range(3):
            want = _similarity_loop(np.asarray(metric[b]), np.asarray(importance[b]), k, protected)
            assert list(np.asarray(keep[b])) == want, (k, b)


def test_protected_token_is_never_pruned(x64):
    # Token 0 is the least important and an exact twin of an important token.
    n = 7
    metric = jax.random.normal(jax.random.PRNGKey(4), (1, n, 3), jnp.float64)
    metric = metric.at[:, 0].set(metric[:, 3])
    sink = jnp.zeros((1, 2, n, n), jnp.float64).at[..., 3].set(1.0)
    keep = zero_tprune(sink, metric, 3, 1, num_iterations=2, num_protected=1)
    assert keep.shape == (1, n - 4) and int(keep[0, 0]) == 0
    assert 3 in np.asarray(keep[0])


def test_zero_tprune_composes_the_stages(x64):
    attention = _attention(jax.random.PRNGKey(5), 2, 2, 10)
    metric = jax.random.normal(jax.random.PRNGKey(6), (2, 10, 4), jnp.float64)
    keep = zero_tprune(attention, metric, 2, 3, num_iterations=4, num_protected=1)
    importance = token_importance(attention, 4)
    first = importance_stage(importance, 2, num_protected=1)
    second = similarity_stage(
        gather_tokens(metric, first), gather_tokens(importance, first), 3, num_protected=1
    )
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(gather_tokens(first, second)))
    assert keep.shape == (2, 5) and bool(jnp.all(jnp.diff(keep, axis=1) > 0))


def test_schedule_and_bad_counts():
    assert prune_schedule(17, 3, 2, (1, 2, 3), 1) == ((2, 1), (2, 2), (2, 3))
    # Ints clip per block as ToMe's schedule does.
    assert prune_schedule(9, 2, 0, 4, 1) == ((0, 4), (0, 2))
    with pytest.raises(ValueError, match=r"num_similarity\[1\]=3 is too large"):
        prune_schedule(9, 2, 0, (4, 3), 1)
    with pytest.raises(ValueError, match=r"num_importance\[0\]=9 is too large"):
        prune_schedule(9, 2, (9, 0), 0, 1)
    with pytest.raises(ValueError, match="num_importance must be an int >= 0, got -1"):
        prune_schedule(9, 2, -1, 0)
    with pytest.raises(ValueError, match="one value per block"):
        prune_schedule(9, 2, (1,), 0)
    scores = jnp.ones((1, 5))
    with pytest.raises(ValueError, match="k must be <= N - num_protected = 4"):
        importance_stage(scores, 5, num_protected=1)
    with pytest.raises(ValueError, match="k must be an int >= 0, got -1"):
        importance_stage(scores, -1)
    with pytest.raises(ValueError, match=r"k must be <= \(N - num_protected\) // 2 = 2"):
        similarity_stage(jnp.ones((1, 5, 2)), scores, 3)
    with pytest.raises(ValueError, match=r"attention must be \[B, H, N, N\]"):
        weighted_page_rank(jnp.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="num_iterations must be an int >= 1, got 0"):
        weighted_page_rank(jnp.ones((1, 1, 4, 4)), 0)


# ------------------------------------------------------------------ block and model


def _vit(**kwargs):
    base = dict(num_classes=3, image_size=8, patch_size=2, embed_dim=8, num_layers=2, num_heads=2)
    return VisionTransformer(**(base | kwargs))


def test_mixer_probabilities_and_output_match_the_plain_path(x64):
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 6, 16), jnp.float64)
    mixer = MultiHeadAttention(num_heads=4, num_kv_heads=2, param_dtype=jnp.float64)
    variables = mixer.init(jax.random.PRNGKey(8), x)
    plain = mixer.apply(variables, x)
    y, probs = mixer.apply(variables, x, return_attention_probs=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(plain), rtol=1e-12, atol=1e-13)
    assert probs.shape == (2, 4, 6, 6)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-12)


def test_pruning_zero_is_bit_identical_and_counts_follow_schedule():
    x = jax.random.normal(jax.random.PRNGKey(9), (2, 8, 8, 3))
    plain = _vit()
    variables = plain.init(jax.random.PRNGKey(10), x)  # pruning adds no parameters
    off = plain.clone(zero_tprune_importance=0, zero_tprune_similarity=0)
    assert bool(jnp.all(off.apply(variables, x) == plain.apply(variables, x)))
    # Block 1 prunes nothing and runs as without the option; the class token stays.
    model = plain.clone(zero_tprune_importance=(2, 0), zero_tprune_similarity=(3, 0))
    assert model.zero_tprune_schedule == ((2, 3), (0, 0))
    logits, state = model.apply(variables, x, mutable=["intermediates"])
    (kept,) = state["intermediates"]["zero_tprune_kept"]
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))
    assert kept.shape == (2, 17 - 5) and bool(jnp.all(kept[:, 0] == 0))


def test_block_prunes_after_attention(x64):
    x = jax.random.normal(jax.random.PRNGKey(12), (2, 9, 16), jnp.float64)
    block = ResidualBlock(
        mixer="attention",
        mixer_kwargs=dict(num_heads=2, param_dtype=jnp.float64),
        ffn="gelu",
        ffn_hidden_dim=16,
        ordering="pre_norm",
    )
    variables = block.init(jax.random.PRNGKey(13), x)
    out, keep = block.apply(variables, x, prune_importance=2, prune_similarity=3, wpr_iterations=3)
    # Reference, sub-layer by sub-layer: norm1, attention (its graph and mean keys),
    # residual, prune, then norm2, FFN, residual on the kept tokens.
    params = variables["params"]
    sub = lambda module, name, y: module.apply({"params": params[name]}, y)  # noqa: E731
    mixer = MultiHeadAttention(num_heads=2, param_dtype=jnp.float64)
    y, keys, probs = mixer.apply(
        {"params": params["mixer"]},
        sub(make_norm("layer_norm"), "norm1", x),
        return_mean_keys=True,
        return_attention_probs=True,
    )
    want_keep = zero_tprune(probs, keys, 2, 3, num_iterations=3)
    h = gather_tokens(x + y, want_keep)
    want = h + make_ffn("gelu", 16).apply(
        {"params": params["ffn"]}, sub(make_norm("layer_norm"), "norm2", h)
    )
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(want_keep))
    assert out.shape == (2, 4, 16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-12, atol=1e-12)


def test_bad_settings_are_refused():
    x = jnp.ones((1, 5, 8))
    block = ResidualBlock(
        mixer="attention", mixer_kwargs=dict(num_heads=2), ffn="gelu", ffn_hidden_dim=8
    )
    variables = block.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="token pruning .* needs mask=None"):
        block.apply(variables, x, mask=AttentionMask(causal=True), prune_importance=1)
    with pytest.raises(ValueError, match="cannot be combined"):
        block.apply(variables, x, token_sizes=jnp.ones((1, 5)), prune_similarity=1)
    with pytest.raises(ValueError, match=r"zero_tprune_importance=\(17, 0\) .* is invalid"):
        _vit(zero_tprune_importance=(17, 0)).check_config()
    with pytest.raises(ValueError, match="cannot be combined"):
        _vit(zero_tprune_importance=1, tome_r=1).check_config()
    with pytest.raises(ValueError, match="zero_tprune_iterations must be None or an int >= 1"):
        _vit(zero_tprune_similarity=1, zero_tprune_iterations=0).check_config()
