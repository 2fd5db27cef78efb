"""Properties the papers claim, swept over every registered model's tiny preset.

Per-model tests live next to each model; this file makes sure a model added to
the registry without its own property test is still checked (or explicitly
skipped, with the reason, in the plan below):

(a) causality: a causal LM's (or a decoder's) outputs at positions <= t do not
    change when tokens t+1.. change (and do change after t, so the test bites);
(b) cached decoding: feeding the tokens one call at a time against the KV cache /
    recurrent state gives the logits of the parallel forward;
(c) padding: a padded row (segment ids / token or frame mask / pad id; token models
    both right- and left-padded) gives, at its real positions, what the same
    sequence gives unpadded; (c') packing: the second of two packed sequences gives
    what it gives alone (models whose mixers read segment ids as padding only skip);
(d) ``train=False`` is deterministic and dropout is off: with every dropout rate
    raised and one ``dropout`` key, the output equals the registered model's with
    another key; ``train=True`` does change it (the rates really are wired).

Cost: one compiled program per distinct tiny model (init and every forward of
(a), (c), (d)), plus (b)'s one-token step; XLA compilation is nearly all the time.

Every model class must appear in ``_family``: a new class fails here until its
properties are classified. Models whose tiny module is identical (``repr``) to an
earlier one's share the computation (the Ettin sizes, the Mamba sizes, ...).
Float32 throughout: a property violation moves outputs by far more than the
tolerances (a few float32 ulps of logits of size ~1, accumulated over <= 12 positions).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models.careless_whisper import CarelessWhisper
from effformer.models.combiner import CombinerTransformerLM
from effformer.models.fit import FITLM
from effformer.models.generate import zero_cache
from effformer.models.lm_layers import expand_layer_pattern
from effformer.models.lmuformer import LMUFormer
from effformer.models.mamba_classifier import MambaClassifier
from effformer.models.mamba_lm import MambaLM
from effformer.models.paraformer import FrameEncoderDecoder, Paraformer
from effformer.models.solo import SOLO
from effformer.models.tinyfusion import TinyFusionLM
from effformer.models.transformer_lm import EncoderDecoderLM, TransformerLM


def _distinct_names() -> list[str]:
    """One registered name per distinct tiny module (identical ``repr``: the Ettin and
    Mamba sizes, ...). Names registered by other test modules (``test_*``) are not the
    library's."""
    first: dict[str, str] = {}
    for name in models.list_models():
        if not name.startswith("test_"):
            first.setdefault(repr(models.create(name, tiny=True)), name)
    return list(first.values())


NAMES = _distinct_names()
DROPOUT_FIELDS = ("dropout_rate", "attention_dropout_rate", "drop_path_rate")
# Decode vs parallel forward: different summation orders over <= 12 cached positions
# (and Mamba's chunked scan vs its recurrence) in float32, logits of size ~1.
DECODE_ATOL = 2e-5
# Rows of one batch under different masks: same ops, different reductions lengths.
SAME_ATOL = 1e-5


def _compiled(fn: Callable, *args: Any) -> Callable:
    """``jax.jit(fn)`` compiled for ``args``' shapes (tests/conftest.py sets fast flags)."""
    return jax.jit(fn).lower(*args).compile()


def _run(fn: Callable, *args: Any) -> Any:
    """``jax.jit(fn)(*args)``: one compilation, one run."""
    return _compiled(fn, *args)(*args)


# Families whose outputs are one vector per input, not per position, or which see the
# whole input by design: no causality or cached decoding to check.
VISION = "vision"  # images: bidirectional encoders / classifiers, fixed-size inputs

# ---------------------------------------------------------------------------- plan

# property -> family -> reason it does not apply (a skip with that reason).
SKIPS: dict[str, dict[str, str]] = {
    "causal": {
        VISION: "image model: bidirectional encoder over a fixed-size image",
        "encoder": "bidirectional encoder (kind='encoder')",
        "paraformer": "non-autoregressive: the CIF decoder reads all fired tokens at once",
        "mamba_classifier": "sequence classifier: one output per sequence (padding: see (c))",
    },
    "decode": {
        VISION: "image model: no decoding",
        "encoder": "bidirectional encoder: no decoding",
        "paraformer": "non-autoregressive: decodes all tokens in one parallel call",
        "mamba_classifier": "sequence classifier: no decoding",
        "combiner_lm": "Combiner mixers refuse decode=True (no incremental decoding; "
        "documented in effformer.mixers.combiner)",
        "fit_lm": "FITLM has no cached decode path (no decode argument; documented)",
        "lmuformer": "streaming path is effformer.models.lmuformer_stream (own tests), "
        "not a decode argument of the registered module",
    },
    "padding": {
        VISION: "fixed-size images: no padding mask",
        "lmuformer": "takes no padding mask: fixed-length inputs (BatchNorm; documented)",
        "prefix_lm": "prefix_lengths with segment_ids is refused (one prefix per row; "
        "documented); right padding after the prefix is invisible by causality, checked in (a)",
        "fit_lm": "FITLM takes one sequence per row, no segment_ids (documented); right "
        "padding is invisible by causality, checked in (a)",
    },
}


def _family(model: Any) -> str:
    """The property family of a registered model (a new class must be added here)."""
    if isinstance(model, TinyFusionLM):
        return "tinyfusion"
    if isinstance(model, SOLO):
        return "solo"
    if isinstance(model, CombinerTransformerLM) and model.kind == "decoder":
        return "combiner_lm"
    if isinstance(model, TransformerLM):
        return {"decoder": "decoder", "prefix_lm": "prefix_lm", "encoder": "encoder"}[model.kind]
    if isinstance(model, FrameEncoderDecoder):
        return "frame_seq2seq"
    if isinstance(model, EncoderDecoderLM):
        return "seq2seq"
    if isinstance(model, MambaLM):
        return "mamba_lm"
    if isinstance(model, FITLM):
        return "fit_lm"
    if isinstance(model, CarelessWhisper):
        return "whisper"
    if isinstance(model, Paraformer):
        return "paraformer"
    if isinstance(model, LMUFormer):
        return "lmuformer"
    if isinstance(model, MambaClassifier):
        return "mamba_classifier"
    module = type(model).__module__
    if module.split(".")[-1] in ("vit", "vit_variants", "illama", "tinyvit", "local_learning"):
        return VISION
    if type(model).__name__ == "FITClassifier":
        return VISION
    raise AssertionError(
        f"{type(model).__name__} ({module}) is not classified in test_registry_properties: "
        "add its family (and any property that does not apply, with the reason, to SKIPS)."
    )


def _skip_unless_applies(prop: str, family: str) -> None:
    reason = SKIPS[prop].get(family)
    if reason is not None:
        pytest.skip(reason)


# ---------------------------------------------------------------------------- helpers


def _with_dropout(model: Any, rate: float) -> Any:
    """The model with every dropout / stochastic-depth rate it has set to ``rate``."""
    if isinstance(model, TinyFusionLM):
        return dataclasses.replace(model, lm=_with_dropout(model.lm, rate))
    if isinstance(model, SOLO):
        return model.clone(lm=_with_dropout(model.lm, rate))
    fields = {f.name for f in dataclasses.fields(model)}
    return model.clone(**{name: rate for name in DROPOUT_FIELDS if name in fields})


def _has_dropout(model: Any) -> bool:
    inner = model.lm if isinstance(model, (TinyFusionLM, SOLO)) else model
    return any(f.name in DROPOUT_FIELDS for f in dataclasses.fields(inner))


# Static call arguments of a family's canonical forward.
STATIC_KWARGS: dict[str, dict[str, Any]] = {"lmuformer": {"per_position": True}}


def _apply(model: Any, variables: Any, inputs: dict, *, train: bool = False, rng=None, **kw):
    """Outputs of one call (BatchNorm's updated statistics dropped)."""
    rngs = {"dropout": rng if rng is not None else jax.random.PRNGKey(7)}
    if train and "batch_stats" in variables:
        out, _ = model.apply(variables, **inputs, train=True, rngs=rngs, mutable=["batch_stats"],
                             **kw)  # fmt: skip
        return out
    return model.apply(variables, **inputs, train=train, rngs=rngs, **kw)


def _tokens(key: int, shape: tuple[int, ...], vocab: int) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(key), shape, 1, vocab, jnp.int32)


def _vocab(model: Any) -> int:
    return model.lm.vocab_size if isinstance(model, (TinyFusionLM, SOLO)) else model.vocab_size


@functools.cache
def _family_of(name: str) -> str:
    return _family(models.create(name, tiny=True))


def _frames(key: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(key), shape)


@dataclasses.dataclass(frozen=True)
class Bundle:
    """One tiny model, its variables, and its forwards on its canonical batch of two rows.

    inputs: for causal models row 1 is row 0 with every input after ``t`` changed
    (for LMUFormer, after ``t`` plus its documented look-ahead); random values otherwise.
    outputs: (eval with dropout raised, key A; eval of the model as registered, key B;
    train with dropout raised, key A, or None without dropout fields).
    """

    model: Any
    variables: Any
    family: str
    inputs: dict
    t: int
    outputs: tuple
    padding: tuple  # (outputs of _padding_plan's calls, its post), or ((), None)


_TOKEN_FAMILIES = ("decoder", "prefix_lm", "encoder", "combiner_lm", "mamba_lm", "fit_lm",
                   "solo", "tinyfusion")  # fmt: skip


def _canonical_inputs(model: Any, family: str) -> tuple[dict, int]:
    """(canonical batch of two rows, t): see :class:`Bundle`."""
    inputs = model.dummy_inputs(2)
    if family == "lmuformer":
        # The patch embedding's num_conv_layers centred kernel-3 convolutions plus the
        # position convolution look ahead one input each (documented: with the
        # original's 4, position t sees inputs up to t + 5).
        x = _frames(3, (1, *inputs["inputs"].shape[1:]))
        t = 5
        cut = t + model.num_conv_layers + 2
        y = x.at[:, cut:].set(_frames(4, x[:, cut:].shape))
        return {"inputs": jnp.concatenate([x, y])}, t
    if family in ("seq2seq", "frame_seq2seq", "whisper"):
        source = inputs["inputs"][:1]
        source = (_tokens(5, source.shape, model.vocab_size) if family == "seq2seq"
                  else _frames(5, source.shape))  # fmt: skip
        length, t = 6, 2
        x = _tokens(3, (1, length), model.vocab_size)
        y = x.at[:, t + 1 :].set(_tokens(4, (1, length - t - 1), model.vocab_size))
        return {"inputs": jnp.concatenate([source, source]),
                "decoder_inputs": jnp.concatenate([x, y])}, t  # fmt: skip
    # Random values (dummy inputs are zeros/ones, which zero-initialised heads map to
    # 0), the same in both rows (SOLO's patches: only the perturbed tokens may differ).
    inputs = {
        k: jnp.broadcast_to(_frames(13, v.shape[1:]), v.shape)
        if jnp.issubdtype(v.dtype, jnp.floating)
        else v
        for k, v in inputs.items()
    }
    if family in _TOKEN_FAMILIES:
        length = inputs["inputs"].shape[1]
        t = length // 2
        x = _tokens(3, (1, length), _vocab(model))
        y = x.at[:, t + 1 :].set(_tokens(4, (1, length - t - 1), _vocab(model)))
        inputs["inputs"] = jnp.concatenate([x, y])
        return inputs, t
    return inputs, -1


_BUNDLES: dict[str, Bundle] = {}  # by the repr of the tiny module: identical ones share


def _make_bundle(name: str) -> Bundle:
    model = models.create(name, tiny=True)
    family = _family(model)
    inputs, t = _canonical_inputs(model, family)
    noisy = _with_dropout(model, 0.3)
    keys = jax.random.PRNGKey(11), jax.random.PRNGKey(12)
    kw = STATIC_KWARGS.get(family, {})
    plan = _padding_plan(model, family)
    calls, post = plan if plan is not None else ([], None)

    def run(inputs, calls):  # one compilation per model: init and every forward
        variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                               **inputs)  # fmt: skip
        return (
            variables,
            (
                _apply(noisy, variables, inputs, rng=keys[0], **kw),
                _apply(model, variables, inputs, rng=keys[1], **kw),
                _apply(noisy, variables, inputs, train=True, rng=keys[0], **kw)
                if _has_dropout(model)
                else None,
            ),
            [_apply(model, variables, call) for call in calls],
        )

    variables, outputs, padding = _run(run, inputs, calls)
    return Bundle(model, variables, family, inputs, t, outputs, (padding, post))


def _bundle(name: str) -> Bundle:
    key = repr(models.create(name, tiny=True))
    if key not in _BUNDLES:
        _BUNDLES[key] = _make_bundle(name)
    return _BUNDLES[key]


def _built(name: str) -> tuple[Any, Any, str]:
    bundle = _bundle(name)
    return bundle.model, bundle.variables, bundle.family


def _cached(kind: str) -> Callable:
    """Decorator: cache a per-model computation by the repr of its tiny module."""

    def decorator(fn: Callable) -> Callable:
        store: dict[str, Any] = {}

        def wrapper(name: str):
            key = repr(models.create(name, tiny=True))
            if key not in store:
                store[key] = fn(name)
            return store[key]

        return wrapper

    return decorator


def _close(a, b, atol: float, what: str) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0, atol=atol, err_msg=what)  # fmt: skip


def _differs(a, b, what: str) -> None:
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() > 1e-4, what


# ---------------------------------------------------------------------------- (a) causality


def _check_causality(name):
    _skip_unless_applies("causal", _family_of(name))
    bundle = _bundle(name)
    out, t = bundle.outputs[1], bundle.t
    if not np.asarray(out).any():
        # spiking_lmuformer's tiny preset at init: no neuron reaches its threshold.
        pytest.skip("all outputs are zero at init (no spikes): the check cannot bite")
    _close(out[0, : t + 1], out[1, : t + 1], SAME_ATOL, f"{name}: outputs <= {t} saw later inputs")
    _differs(out[0, t + 1 :], out[1, t + 1 :], f"{name}: the perturbation changed nothing")


# ---------------------------------------------------------------------------- (b) decoding


def _step_loop(step: Callable, cache: Any, tokens: jax.Array, start: int = 0) -> jax.Array:
    """Logits [B, L - start, V] of feeding tokens[:, start:] one per call (one compiled step)."""
    batch = tokens.shape[0]
    step = _compiled(step, cache, tokens[:, :1], jnp.zeros((batch, 1), jnp.int32))
    logits = []
    for t in range(start, tokens.shape[1]):
        out, cache = step(cache, tokens[:, t : t + 1], jnp.full((tokens.shape[0], 1), t, jnp.int32))
        logits.append(out)
    return jnp.concatenate(logits, axis=1)


@_cached("decode")
def _decode_outputs(name: str) -> tuple[jax.Array, jax.Array]:
    """(parallel logits, cached-decode logits) of the canonical batch."""
    bundle = _bundle(name)
    model, family, inputs = bundle.model, bundle.family, bundle.inputs
    params = {k: v for k, v in bundle.variables.items() if k != "cache"}
    full = bundle.outputs[1]
    one = jnp.zeros((2, 1), jnp.int32)
    if family in ("seq2seq", "frame_seq2seq", "whisper"):
        tokens = inputs["decoder_inputs"]
        encoded, mask = _run(
            lambda v, x: model.apply(v, x, method="encode"), params, inputs["inputs"]
        )
        if family == "whisper":
            slots = jnp.zeros(tokens.shape, jnp.int32)  # the cache holds the init call's length
            cache = zero_cache(lambda: model.init(jax.random.PRNGKey(0), slots, slots, encoded,
                                                  mask, method="decode_cached"))  # fmt: skip

            def step(cache, tok, pos):
                out, mutated = model.apply({**params, "cache": cache}, tok, pos, encoded, mask,
                                           method="decode_cached", mutable=["cache"])  # fmt: skip
                return out, mutated["cache"]
        else:
            cacher = model.clone(max_decode_length=tokens.shape[1])
            cache = zero_cache(lambda: cacher.init(jax.random.PRNGKey(0), one, encoded, mask,
                                                  positions=one, decode=True, method="decode"))  # fmt: skip

            def step(cache, tok, pos):
                out, mutated = cacher.apply({**params, "cache": cache}, tok, encoded, mask,
                                            positions=pos, decode=True, method="decode",
                                            mutable=["cache"])  # fmt: skip
                return out, mutated["cache"]

        return full, _step_loop(step, cache, tokens)

    tokens = inputs["inputs"]
    length = tokens.shape[1]
    extra = {k: v for k, v in inputs.items() if k != "inputs"}
    if family == "solo":
        cacher = model.clone(lm=model.lm.clone(max_decode_length=length))
    elif family == "tinyfusion":
        cacher = dataclasses.replace(model, lm=model.lm.clone(max_decode_length=length))
    elif family == "mamba_lm":
        cacher = model
    else:
        cacher = model.clone(max_decode_length=length)

    def step_extra(pos: jax.Array) -> dict[str, Any]:
        if family != "solo":
            return dict(extra)
        index = jnp.take_along_axis(extra["patch_indices"], pos, axis=1)
        return {"patches": extra["patches"], "patch_indices": index}

    lm = cacher.lm if family == "tinyfusion" else cacher
    init_kwargs = {} if family == "mamba_lm" else {"positions": one}
    cache = zero_cache(lambda: lm.init(jax.random.PRNGKey(0), one, decode=True, **init_kwargs,
                                       **step_extra(one)))  # fmt: skip

    def call(cache, tok, pos):
        kwargs = {} if family == "mamba_lm" else {"positions": pos}
        out, mutated = cacher.apply({**params, "cache": cache}, tok, decode=True,
                                    mutable=["cache"], **kwargs, **step_extra(pos))  # fmt: skip
        return out, mutated["cache"]

    if family != "prefix_lm":
        return full, _step_loop(call, cache, tokens)
    # The bidirectional prefix goes in one call, then one token per call.
    prefix = int(extra["prefix_lengths"][0])
    positions = jnp.broadcast_to(jnp.arange(prefix), (2, prefix))
    first, cache = _run(call, cache, tokens[:, :prefix], positions)
    return full, jnp.concatenate([first, _step_loop(call, cache, tokens, prefix)], axis=1)


def _check_cached_decoding(name):
    _skip_unless_applies("decode", _family_of(name))
    full, stepped = _decode_outputs(name)
    _close(stepped, full, DECODE_ATOL, f"{name}: cached decoding != parallel forward")


# ---------------------------------------------------------------------------- (c) padding


def _padding_plan(model: Any, family: str) -> tuple[list[dict], Callable] | None:
    """The calls of (c) and (c'), run in the model's bundle, and what to compare.

    Returns (inputs of each call, post) with post(outputs of the calls) -> (padded
    row's outputs at its real positions, the unpadded sequence's; for token models also
    a packed second sequence's outputs, the same sequence alone), or None.
    """
    if family in SKIPS["padding"]:
        return None
    vocab = _vocab(model) if hasattr(model, "lm") or hasattr(model, "vocab_size") else None
    if family in ("seq2seq", "frame_seq2seq", "whisper", "paraformer"):
        real, width = 8, 12
        if family == "seq2seq":  # source padding is pad_id
            source = _tokens(5, (1, real), vocab)
            padded = jnp.pad(source, ((0, 0), (0, width - real)), constant_values=model.pad_id)
        else:
            source = _frames(5, (1, real, model.dummy_inputs(1)["inputs"].shape[2]))
            # Zero frames are padding for the frame encoder-decoder; the others take a mask
            # and must ignore whatever the padding holds.
            junk = 0.0 if family == "frame_seq2seq" else 3.0
            padded = jnp.pad(source, ((0, 0), (0, width - real), (0, 0)), constant_values=junk)
        mask = jnp.arange(width)[None] < real
        if family == "paraformer":
            targets = _tokens(3, (1, 4), vocab)
            calls = [{"inputs": padded, "frame_mask": mask, "targets": targets},
                     {"inputs": source, "targets": targets}]  # fmt: skip
            return calls, lambda out: (out[0]["logits"], out[1]["logits"])
        target = {"decoder_inputs": _tokens(3, (1, 6), vocab)}
        extra = {"frame_mask": mask} if family == "whisper" else {}
        return [{"inputs": padded, **extra, **target}, {"inputs": source, **target}], tuple
    if family == "mamba_classifier":
        shape = model.dummy_inputs(1)["inputs"].shape
        real = shape[1] - 8
        source = _frames(5, (1, real, shape[2]))
        padded = jnp.concatenate([source, _frames(6, (1, 8, shape[2]))], axis=1)
        mask = jnp.arange(shape[1])[None] < real
        return [{"inputs": padded, "token_mask": mask}, {"inputs": source}], tuple
    # Token models: segment_ids, 0 = padding (junk tokens there, not zeros). Row 0 is
    # right-padded, row 1 left-padded (positions restart with the segment ids); row 2
    # packs two sequences, for (c'), compared with its second sequence alone.
    inputs = model.dummy_inputs(1)
    width = inputs["inputs"].shape[1]
    real, pad, first = width - 3, 3, width // 2
    tokens = _tokens(3, (1, width), vocab)
    left = jnp.concatenate([_tokens(9, (1, pad), vocab), tokens[:, :real]], axis=1)
    packed = _tokens(8, (1, width), vocab)
    index = jnp.arange(width)[None]
    segment_ids = jnp.concatenate([index < real, index >= pad, 1 + (index >= first)])
    unpadded = {**inputs, "inputs": tokens[:, :real]}
    alone = {**inputs, "inputs": packed[:, first:]}
    if "patch_indices" in inputs:  # SOLO: the same patches, at the real tokens' slots
        indices = inputs["patch_indices"]
        unpadded["patch_indices"] = indices[:, :real]
        shifted = jnp.concatenate([jnp.full((1, pad), -1, indices.dtype), indices[:, :real]], 1)
        text = jnp.full((1, width), -1, indices.dtype)  # the packed row: text only
        inputs["patch_indices"] = jnp.concatenate([indices, shifted, text])
        unpadded["patches"] = alone["patches"] = _frames(6, inputs["patches"].shape)
        inputs["patches"] = jnp.concatenate([unpadded["patches"]] * 3)
        alone["patch_indices"] = text[:, first:]
    padded = {
        **inputs,
        "inputs": jnp.concatenate([tokens, left, packed]),
        "segment_ids": segment_ids.astype(jnp.int32),
    }

    def post(outputs: list) -> tuple:
        a, b, c = outputs
        if a.ndim == 3:  # per position: the real ones
            return jnp.stack([a[0, :real], a[1, pad:]]), jnp.concatenate([b, b]), a[2:, first:], c
        return a[:2], jnp.concatenate([b, b]), None, None

    return [padded, unpadded, alone], post


def _padding_outputs(name: str) -> tuple:
    bundle = _bundle(name)
    return bundle.padding[1](list(bundle.padding[0]))


def _check_padding(name):
    _skip_unless_applies("padding", _family_of(name))
    padded, unpadded = _padding_outputs(name)[:2]
    _close(padded, unpadded, SAME_ATOL, f"{name}: padding changed the real positions")


# ---------------------------------------------------------------------------- (d) determinism


def _common_leaves(a: Any, b: Any) -> tuple[list, list]:
    """Leaves of two outputs, restricted to their common keys when they are dicts
    (Paraformer's training outputs differ from its evaluation outputs)."""
    if isinstance(a, dict):
        a, b = ({k: a[k] for k in a if k in b}, {k: b[k] for k in a if k in b})
    return jax.tree.leaves(a), jax.tree.leaves(b)


def _check_eval_mode(name):
    # Raised dropout with key A equals the model as registered with key B: train=False
    # neither drops anything nor reads the dropout key.
    noisy, plain, trained = _bundle(name).outputs
    for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(plain), strict=True):
        _close(a, b, SAME_ATOL, f"{name}: train=False output depends on dropout or its key")
    if trained is not None:
        changed = [
            np.abs(np.asarray(a, np.float32) - np.asarray(t, np.float32)).max() > 1e-6
            for a, t in zip(*_common_leaves(noisy, trained), strict=True)
            if np.issubdtype(np.asarray(a).dtype, np.floating)
        ]
        assert any(changed), f"{name}: dropout rates {DROPOUT_FIELDS} do nothing with train=True"


# ------------------------------------------------------------------- (c') packed sequences

# Mixers whose segment ids only mark padding (they do not separate packed sequences).
PADDING_ONLY_MIXERS = frozenset({"mamba", "lmu", "combiner"})
PACKED_SKIPS: dict[str, str] = {
    "mamba_lm": "MambaLM's segment_ids mark padding only: one sequence per row (documented)",
    "prefix_lm": SKIPS["padding"]["prefix_lm"],
    "fit_lm": SKIPS["padding"]["fit_lm"],
}


def _check_packing(name):
    family = _family_of(name)
    if family not in _TOKEN_FAMILIES:
        pytest.skip("takes no segment_ids (no packing)")
    if family in PACKED_SKIPS:
        pytest.skip(PACKED_SKIPS[family])
    model = models.create(name, tiny=True)
    if getattr(model, "num_classes", None) is not None:
        pytest.skip("sequence classifier: one output per row, not per packed sequence")
    lm = model.lm if isinstance(model, (TinyFusionLM, SOLO)) else model
    kinds = {spec.kind for spec in expand_layer_pattern(lm.layer_pattern, lm.num_layers,
                                                        lm.layer_overrides)}  # fmt: skip
    if kinds & PADDING_ONLY_MIXERS:
        pytest.skip(
            f"{sorted(kinds & PADDING_ONLY_MIXERS)} layers read segment ids as a padding mask "
            "only: one sequence per row (documented in their mixers and TransformerLM)"
        )
    packed, alone = _padding_outputs(name)[2:]
    _close(packed, alone, SAME_ATOL, f"{name}: a packed sequence saw its neighbour")


# ---------------------------------------------------------------------- the tiny preset


def _check_tiny_preset(name):
    # The registered tiny preset builds, runs and stays tiny: finite outputs with the
    # batch's leading dimension, under 2M parameters (what tests and notebooks rely on).
    bundle = _bundle(name)
    leaves = jax.tree.leaves(bundle.outputs[1])
    assert leaves and all(np.isfinite(np.asarray(leaf, np.float32)).all() for leaf in leaves)
    assert all(leaf.shape[0] == 2 for leaf in leaves if jnp.ndim(leaf) > 0), name
    num_params = sum(x.size for x in jax.tree.leaves(bundle.variables["params"]))
    assert num_params < 2_000_000, f"tiny preset of {name} has {num_params} parameters"


# ------------------------------------------------------------------------- the one test

CHECKS = (_check_tiny_preset, _check_causality, _check_cached_decoding, _check_padding,
          _check_eval_mode, _check_packing)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_registered_model_has_the_claimed_properties(name):
    # One test per model, not one per property: each model's computations are cached in
    # its worker process, and pytest-xdist would send a model's properties to both.
    skipped = []
    for check in CHECKS:
        try:
            check(name)
        except pytest.skip.Exception as reason:
            skipped.append(f"{check.__name__.removeprefix('_check_')}: {reason}")
    if len(skipped) == len(CHECKS):
        pytest.skip("; ".join(skipped))
