import itertools

import jax
import numpy as np
import pytest

from effformer.mixers import MultiHeadAttention
from effformer.nn.block import ResidualBlock
from effformer.nn.ffn import MLP
from effformer.nn.norms import LayerNorm, RMSNorm
from effformer.ops.masks import AttentionMask

B, L, D, HIDDEN = 4, 5, 8, 16


def _x(batch=B):
    return jax.random.normal(jax.random.key(0), (batch, L, D))


def _randomise(variables):
    """Norm scales/biases start at 1/0: make every leaf random so each term is visible."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    values = [0.5 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, values)


def _parts(params, norm_cls):
    mask = AttentionMask(causal=True)
    mixer = lambda y: MultiHeadAttention(2).apply({"params": params["mixer"]}, y, mask=mask)
    ffn = lambda y: MLP(HIDDEN).apply({"params": params["ffn"]}, y)
    n1 = lambda y: norm_cls().apply({"params": params["norm1"]}, y)
    n2 = lambda y: norm_cls().apply({"params": params["norm2"]}, y)
    return mixer, ffn, n1, n2


def _block(ordering, norm="layer_norm", **kwargs):
    return ResidualBlock(
        mixer=MultiHeadAttention(2),
        ffn="gelu",
        ffn_hidden_dim=HIDDEN,
        norm=norm,
        norm_epsilon=1e-5 if norm == "layer_norm" else 1e-6,
        ordering=ordering,
        **kwargs,
    )


@pytest.mark.parametrize(
    "ordering, norm",
    [("pre_norm", "rms_norm"), ("post_norm", "layer_norm"), ("cct", "layer_norm")],
)
def test_orderings_match_manual_composition(ordering, norm):
    x = _x()
    block = _block(ordering, norm)
    variables = _randomise(block.init(jax.random.key(1), x))
    mixer, ffn, n1, n2 = _parts(variables["params"], RMSNorm if norm == "rms_norm" else LayerNorm)
    if ordering == "pre_norm":
        h = x + mixer(n1(x))
        want = h + ffn(n2(h))
    elif ordering == "post_norm":
        h = n1(x + mixer(x))
        want = n2(h + ffn(h))
    else:  # CCT: the residual stream itself is normalised between the branches
        h = n2(x + mixer(n1(x)))
        want = h + ffn(h)
    got = block.apply(variables, x, mask=AttentionMask(causal=True))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_drop_path_drops_each_branch_per_example():
    x = _x(batch=16)
    block = _block("pre_norm", drop_path_rate=0.5)
    variables = _randomise(block.init(jax.random.key(1), x))
    mixer, ffn, n1, n2 = _parts(variables["params"], LayerNorm)
    got = block.apply(
        variables,
        x,
        mask=AttentionMask(causal=True),
        deterministic=False,
        rngs={"dropout": jax.random.key(3)},
    )
    # Each example is one of the four keep/drop combinations, branches scaled by 2.
    candidates = []
    for keep_mixer, keep_ffn in itertools.product([0.0, 2.0], repeat=2):
        h = x + keep_mixer * mixer(n1(x))
        candidates.append(h + keep_ffn * ffn(n2(h)))
    matched = [
        [np.allclose(got[b], c[b], atol=1e-5) for c in candidates] for b in range(x.shape[0])
    ]
    assert all(any(row) for row in matched)
    assert len({row.index(True) for row in matched}) > 1  # not the same choice everywhere
    # A call-time rate of 0 (a schedule) turns it off.
    off = block.apply(
        variables,
        x,
        mask=AttentionMask(causal=True),
        deterministic=False,
        drop_path_rate=0.0,
        rngs={"dropout": jax.random.key(3)},
    )
    np.testing.assert_allclose(off, block.apply(variables, x, mask=AttentionMask(causal=True)))


def test_names_and_forwarded_mask():
    x = _x()
    block = ResidualBlock(
        mixer="attention",
        mixer_kwargs={"num_heads": 2},
        ffn="swiglu",
        ffn_hidden_dim=HIDDEN,
        norm="rms_norm",
    )
    variables = block.init(jax.random.key(1), x)
    assert set(variables["params"]) == {"mixer", "ffn", "norm1", "norm2"}
    assert set(variables["params"]["ffn"]) == {"w1", "w2", "w3"}
    # The causal mask reaches the mixer: the first output ignores later tokens.
    causal = AttentionMask(causal=True)
    changed = x.at[:, 1:].add(1.0)
    out, out_changed = (block.apply(variables, v, mask=causal) for v in (x, changed))
    np.testing.assert_allclose(out[:, 0], out_changed[:, 0], atol=1e-6)
    assert not np.allclose(block.apply(variables, x), block.apply(variables, changed)[:, :1])


def test_block_errors():
    x = _x()
    with pytest.raises(ValueError, match="ordering must be one of .*got 'sandwich'"):
        _block("sandwich").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="ffn_hidden_dim is required.*'gelu'.*got None"):
        ResidualBlock(mixer=MultiHeadAttention(2), ffn="gelu").init(jax.random.key(0), x)
