import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.nn.position import (
    POSITION_ENCODINGS,
    alibi_slopes,
    make_position_encoding,
    t5_relative_position_bucket,
)

B, L, H, DH = 2, 7, 3, 8


def _positions(length=L, seed=0, high=50):
    return jax.random.randint(jax.random.key(seed), (B, length), 0, high)


def _qk(seed=0, lq=L, lk=L, heads=H, head_dim=DH):
    kq, kk = jax.random.split(jax.random.key(seed))
    return (
        jax.random.normal(kq, (B, lq, heads, head_dim)),
        jax.random.normal(kk, (B, lk, heads, head_dim)),
    )


def _scores(q, k):
    return np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))


# --------------------------------------------------------------------------- absolute


def test_learned_adds_table_rows_at_positions():
    x = jax.random.normal(jax.random.key(0), (B, L, 6))
    positions = _positions(high=16)
    pe = make_position_encoding("learned", max_length=16)
    variables = pe.init(jax.random.key(1), x, positions, method="embed")
    table = np.asarray(variables["params"]["embedding"])
    assert table.shape == (16, 6)
    got = pe.apply(variables, x, positions, method="embed")
    want = np.asarray(x) + table[np.asarray(positions)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Out of range gives NaN instead of a silently clamped row.
    out = pe.apply(variables, x, positions.at[0, 0].set(16), method="embed")
    assert np.isnan(out[0, 0]).all() and not np.isnan(out[1]).any()


def test_learned_negative_position_gives_nan_not_a_wrapped_row():
    # Regression: jnp.take wraps -1 to the last row even with mode="fill".
    x = jnp.zeros((1, 3, 4))
    pe = make_position_encoding("learned", max_length=8)
    variables = pe.init(jax.random.key(1), x, jnp.zeros((1, 3), jnp.int32), method="embed")
    out = pe.apply(variables, x, jnp.array([[0, -1, -8]]), method="embed")
    assert not np.isnan(out[0, 0]).any()
    assert np.isnan(out[0, 1:]).all()


def test_learned_init_std_is_configurable():
    x, positions = jnp.zeros((1, 4, 64)), jnp.zeros((1, 4), jnp.int32)

    def std(init_std):
        pe = make_position_encoding("learned", max_length=256, init_std=init_std)
        return np.std(
            pe.init(jax.random.key(0), x, positions, method="embed")["params"]["embedding"]
        )

    # PyTorch's trunc_normal_(std=s) (CCT, timm) cuts at +-2 in value, so the table's std
    # is s for s << 2; flax's default cut at +-2 std gave 0.88 s (0.176 for CCT's 0.2).
    assert 0.19 < std(0.2) < 0.21
    assert 0.019 < std(0.02) < 0.021
    # A std of 1 is cut at +-2 std as in torch: 0.88.
    assert 0.85 < std(1.0) < 0.91


@pytest.mark.parametrize("field, value", [("max_length", 0), ("init_std", 0.0)])
def test_learned_bad_fields_are_named(field, value):
    pe = make_position_encoding("learned", **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be"):
        pe.init(
            jax.random.key(0), jnp.zeros((1, 4, 8)), jnp.zeros((1, 4), jnp.int32), method="embed"
        )


@pytest.mark.parametrize("interleaved", [False, True])
def test_sinusoidal_matches_formula_and_has_no_params(interleaved):
    dim = 6
    x = jax.random.normal(jax.random.key(0), (B, L, dim))
    positions = _positions()
    pe = make_position_encoding("sinusoidal", interleaved=interleaved)
    variables = pe.init(jax.random.key(1), x, positions, method="embed")
    assert not jax.tree.leaves(variables)  # fixed, not a parameter
    got = np.asarray(pe.apply(variables, x, positions, method="embed")) - np.asarray(x)
    positions = np.asarray(positions)
    want = np.zeros((B, L, dim))
    for b in range(B):
        for i in range(L):
            p = int(positions[b, i])
            for c in range(dim):
                if interleaved:  # CCT / Vaswani: p / 10000^(2 (c//2) / dim), sin even, cos odd
                    angle = p / 10000 ** (2 * (c // 2) / dim)
                    want[b, i, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
                else:  # [sin(p w_0..), cos(p w_0..)]
                    j = c % (dim // 2)
                    angle = p / 10000 ** (2 * j / dim)
                    want[b, i, c] = math.sin(angle) if c < dim // 2 else math.cos(angle)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_sinusoidal_scale_multiplies_the_table():
    x = jax.random.normal(jax.random.key(0), (B, L, 6))
    positions = _positions()

    def added(**kwargs):
        pe = make_position_encoding("sinusoidal", **kwargs)
        return np.asarray(pe.apply({}, x, positions, method="embed")) - np.asarray(x)

    np.testing.assert_allclose(added(scale=0.03), 0.03 * added(), atol=1e-6)
    with pytest.raises(ValueError, match="scale must be a positive number, got 0.0"):
        added(scale=0.0)


def test_sinusoidal_odd_dim_error():
    with pytest.raises(ValueError, match="dim must be even, got 5"):
        make_position_encoding("sinusoidal").apply(
            {}, jnp.zeros((1, 2, 5)), jnp.zeros((1, 2), jnp.int32), method="embed"
        )


# --------------------------------------------------------------------------- rotary


def _rope_reference(x, positions, base=10000.0, rotary_dim=None):
    x, positions = np.asarray(x, np.float64), np.asarray(positions)
    out = x.copy()
    rotary_dim = rotary_dim or x.shape[-1]
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            p = float(positions[b, i])
            for pair in range(rotary_dim // 2):
                theta = p * base ** (-2 * pair / rotary_dim)
                x0, x1 = x[b, i, :, 2 * pair], x[b, i, :, 2 * pair + 1]
                out[b, i, :, 2 * pair] = x0 * math.cos(theta) - x1 * math.sin(theta)
                out[b, i, :, 2 * pair + 1] = x0 * math.sin(theta) + x1 * math.cos(theta)
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_matches_pairwise_rotation(fraction):
    q, k = _qk()
    qp, kp = _positions(seed=1), _positions(seed=2)
    pe = make_position_encoding("rope", rotary_fraction=fraction)
    got_q, got_k = pe.apply({}, q, k, qp, kp, method="rotate")
    rotary_dim = int(DH * fraction)
    np.testing.assert_allclose(got_q, _rope_reference(q, qp, rotary_dim=rotary_dim), atol=1e-4)
    np.testing.assert_allclose(got_k, _rope_reference(k, kp, rotary_dim=rotary_dim), atol=1e-4)
    np.testing.assert_array_equal(got_q[..., rotary_dim:], q[..., rotary_dim:])


def test_rope_scores_depend_only_on_position_differences():
    q, k = _qk()
    qp, kp = _positions(seed=1), _positions(seed=2)
    pe = make_position_encoding("rope")
    scores = _scores(*pe.apply({}, q, k, qp, kp, method="rotate"))
    shifted = _scores(*pe.apply({}, q, k, qp + 37, kp + 37, method="rotate"))
    np.testing.assert_allclose(scores, shifted, atol=1e-3)
    # ... and do depend on the difference.
    moved = _scores(*pe.apply({}, q, k, qp + 1, kp, method="rotate"))
    assert not np.allclose(scores, moved, atol=1e-2)


def _rope2d_reference(x, positions, base=10000.0):
    half = x.shape[-1] // 2
    rows = _rope_reference(x[..., :half], positions[..., 0], base)
    cols = _rope_reference(x[..., half:], positions[..., 1], base)
    return np.concatenate([rows, cols], axis=-1)


def _grid_positions(seed):
    return jax.random.randint(jax.random.key(seed), (B, L, 2), 0, 20)


def test_rope2d_matches_axial_reference():
    q, k = _qk()
    qp, kp = _grid_positions(1), _grid_positions(2)
    pe = make_position_encoding("rope2d")
    got_q, got_k = pe.apply({}, q, k, qp, kp, method="rotate")
    np.testing.assert_allclose(got_q, _rope2d_reference(q, qp), atol=1e-4)
    np.testing.assert_allclose(got_k, _rope2d_reference(k, kp), atol=1e-4)


def test_rope2d_scores_depend_only_on_grid_offsets():
    q, k = _qk()
    qp, kp = _grid_positions(1), _grid_positions(2)
    pe = make_position_encoding("rope2d")
    scores = _scores(*pe.apply({}, q, k, qp, kp, method="rotate"))
    shift = jnp.array([5, -3])
    shifted = _scores(*pe.apply({}, q, k, qp + shift, kp + shift, method="rotate"))
    np.testing.assert_allclose(scores, shifted, atol=1e-3)
    for axis in (0, 1):  # moving only the rows, or only the columns, changes the scores
        moved = _scores(*pe.apply({}, q, k, qp.at[..., axis].add(1), kp, method="rotate"))
        assert not np.allclose(scores, moved, atol=1e-2)


def test_rotary_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"q_positions must have shape \(2, 7, 2\)"):
        make_position_encoding("rope2d").apply(
            {}, q, k, _positions(), _positions(), method="rotate"
        )
    with pytest.raises(ValueError, match=r"k_positions must have shape \(2, 7\).*got \(2, 5\)"):
        make_position_encoding("rope").apply({}, q, k, _positions(), _positions(5), method="rotate")
    with pytest.raises(ValueError, match="rotary_fraction=0.1, head_dim=8"):
        make_position_encoding("rope", rotary_fraction=0.1).apply(
            {}, q, k, _positions(), _positions(), method="rotate"
        )


# --------------------------------------------------------------------------- relative


def test_alibi_slopes_known_values():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0**-i for i in (2, 4, 6, 8)])
    # H=6: the 4 slopes of H=4, then every other slope of H=8 (1/2, 1/8).
    np.testing.assert_allclose(alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    # H=12: the 8 slopes of H=8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 from H=16.
    np.testing.assert_allclose(
        alibi_slopes(12), [2.0**-i for i in range(1, 9)] + [2.0**-x for x in (0.5, 1.5, 2.5, 3.5)]
    )


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_bias_matches_loops(causal):
    qp, kp = _positions(5, seed=1), _positions(L, seed=2)
    pe = make_position_encoding("alibi", causal=causal)
    got = pe.apply({}, qp, kp, 6, method="attention_bias")
    assert got.shape == (B, 6, 5, L)
    slopes = alibi_slopes(6)
    qp, kp = np.asarray(qp), np.asarray(kp)
    want = np.zeros((B, 6, 5, L))
    for b, h, i, j in np.ndindex(want.shape):
        d = int(qp[b, i]) - int(kp[b, j])
        want[b, h, i, j] = -slopes[h] * (max(d, 0) if causal else abs(d))
    np.testing.assert_allclose(got, want, atol=1e-5)


def _t5_bucket_reference(relative_position, bidirectional, num_buckets, max_distance):
    """Direct transcription of T5's _relative_position_bucket for one integer."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_reference(bidirectional):
    relative = np.arange(-300, 301)
    got = t5_relative_position_bucket(
        jnp.asarray(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    want = [_t5_bucket_reference(int(r), bidirectional, 32, 128) for r in relative]
    np.testing.assert_array_equal(got, want)
    # Offsets up to 300 reach every bucket; bidirectional never uses bucket 16
    # (relative 0 falls in the lower half).
    assert set(want) == (set(range(32)) - {16} if bidirectional else set(range(32)))


def test_t5_bias_looks_up_table():
    qp, kp = _positions(5, seed=1, high=200), _positions(L, seed=2, high=200)
    pe = make_position_encoding("t5", bidirectional=True)
    variables = pe.init(jax.random.key(0), qp, kp, 4, method="attention_bias")
    table = np.asarray(variables["params"]["relative_attention_bias"])
    assert table.shape == (32, 4)
    got = pe.apply(variables, qp, kp, 4, method="attention_bias")
    qp, kp = np.asarray(qp), np.asarray(kp)
    want = np.zeros((B, 4, 5, L))
    for b, h, i, j in np.ndindex(want.shape):
        bucket = _t5_bucket_reference(int(kp[b, j]) - int(qp[b, i]), True, 32, 128)
        want[b, h, i, j] = table[bucket, h]
    np.testing.assert_allclose(got, want, atol=1e-7)


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("name", sorted(POSITION_ENCODINGS))
def test_every_encoding_has_all_hooks(name):
    """Each hook is either the encoding's own or an identity / None."""
    kwargs = {"max_length": 64} if name == "learned" else {}
    pe = make_position_encoding(name, **kwargs)
    x = jax.random.normal(jax.random.key(0), (B, L, DH))
    q, k = _qk()
    positions = _grid_positions(1) if name == "rope2d" else _positions()
    one_d = _positions()
    variables = pe.init(jax.random.key(0), x, one_d, method="embed")
    if name == "t5":
        variables = pe.init(jax.random.key(0), one_d, one_d, H, method="attention_bias")
    embedded = pe.apply(variables, x, one_d, method="embed")
    rq, rk = pe.apply(variables, q, k, positions, positions, method="rotate")
    bias = pe.apply(variables, one_d, one_d, H, method="attention_bias")
    assert (not np.allclose(embedded, x)) == (name in ("learned", "sinusoidal"))
    assert (not np.allclose(rq, q)) == (name in ("rope", "rope2d"))
    assert (bias is not None) == (name in ("alibi", "t5"))
    if bias is not None:
        assert bias.shape == (B, H, L, L)
    if name == "none":
        assert embedded is x and rq is q and rk is k


def test_unknown_encoding_name_lists_known_ones():
    with pytest.raises(ValueError, match="'xpos'.*alibi.*learned.*none.*rope.*rope2d.*t5"):
        make_position_encoding("xpos")


@pytest.mark.parametrize(
    "bidirectional, num_buckets, max_distance, message",
    [
        # max_distance at or below the exact range: the log scale gave negative buckets.
        (True, 32, 8, "max_distance must exceed the exact buckets per direction \\(8"),
        (True, 32, 4, "max_distance must exceed"),
        (False, 32, 16, "max_distance must exceed the exact buckets per direction \\(16"),
        # Fewer than two buckets per direction: a ZeroDivisionError before.
        (True, 2, 128, "num_buckets must be an int >= 4 \\(bidirectional=True\\), got 2"),
        (False, 1, 128, "num_buckets must be an int >= 2 \\(bidirectional=False\\), got 1"),
    ],
)
def test_t5_bad_bucket_settings_are_refused(bidirectional, num_buckets, max_distance, message):
    relative = jnp.arange(-20, 21)
    with pytest.raises(ValueError, match=message):
        t5_relative_position_bucket(
            relative,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
    # The smallest valid settings give buckets in range.
    buckets = t5_relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=4 if bidirectional else 2, max_distance=2
    )
    assert int(buckets.min()) >= 0 and int(buckets.max()) < (4 if bidirectional else 2)


@pytest.mark.parametrize("name", ["alibi", "t5"])
def test_relative_bias_checks_positions_and_heads(name):
    pe = make_position_encoding(name)
    qp, kp = _positions(5), _positions(L)
    variables = pe.init(jax.random.key(0), qp, kp, H, method="attention_bias")
    # Batch 1 on either side broadcasts.
    assert pe.apply(variables, qp[:1], kp, H, method="attention_bias").shape == (B, H, 5, L)
    # 2-D (row, column) positions gave a broadcasting error (ALiBi) or a 5-D bias (T5).
    grid = jnp.zeros((B, L, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"shapes \[B, Lq\] and \[B, Lk\].*got \(2, 7, 2\)"):
        pe.apply(variables, grid, grid, H, method="attention_bias")
    with pytest.raises(ValueError, match=r"got \(2, 5\) and \(3, 7\)"):
        pe.apply(variables, qp, jnp.zeros((3, L), jnp.int32), H, method="attention_bias")
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        pe.apply(variables, qp, kp, 0, method="attention_bias")


@pytest.mark.parametrize("name", ["sinusoidal", "rope", "rope2d"])
@pytest.mark.parametrize("base", [0.0, -10000.0])
def test_non_positive_base_is_refused_not_nan(name, base):
    # base ** (-2i / d) is inf or NaN for base <= 0, so every encoding came out NaN.
    pe = make_position_encoding(name, base=base)
    x = jnp.ones((B, L, DH))
    q, k = _qk()
    positions = _grid_positions(1) if name == "rope2d" else _positions()
    with pytest.raises(ValueError, match=f"base must be a positive number, got {base}"):
        if name == "sinusoidal":
            pe.apply({}, x, positions, method="embed")
        else:
            pe.apply({}, q, k, positions, positions, method="rotate")
