"""Autoregressive generation with a KV cache (and the recurrent states of Mamba and LMU layers).

:func:`generate` runs a decoder or a prefix LM
(:class:`~effformer.models.transformer_lm.TransformerLM` with ``kind="decoder"``,
any mix of attention and Mamba layers, or ``kind="prefix_lm"``, attention only);
:func:`generate_seq2seq` encodes the source and runs the decoder of an
:class:`~effformer.models.transformer_lm.EncoderDecoderLM`. Both decode greedily
(``temperature=0``) or sample from ``softmax(logits / temperature)``,
optionally restricted to the ``top_k`` most likely tokens.

Prompts of different lengths share one batch, **right-padded**, with their
lengths given. Every row is decoded from position 0 in lock-step, so all rows
share one cache index and position t is slot t of every cache (the "forced
prompt" scheme):

* Attention-only models prefill the **whole prompt width** P in one call
  (a prefix LM's prefix must be in one call to be bidirectional), then rewind
  the cache index to the shortest prompt's length. From there each step feeds,
  for every row, its own prompt token while the row is still inside its prompt
  and the token sampled from the previous step's logits after it, and writes
  slot t. A row inside its prompt recomputes the keys and values the prefill
  wrote there (the same function of the same tokens); a row past its prompt
  replaces what the prefill computed from padding. Causality (over mask
  positions in a prefix LM) keeps a slot's padding invisible to every query
  until it is replaced.
* Models with Mamba layers, which advance one token per call and cannot
  rewind their state, feed one token per call from position 0.

A prefix LM gets ``prefix_lengths`` (default: each row's prompt length) in
every call, so its prefix is bidirectional and everything after it causal,
exactly as ``model.apply(tokens, prefix_lengths=...)`` over the whole sequence.

Compilation: the whole loop (and the encoder of an encoder-decoder) is one
jitted function, cached by its static arguments (the model's configuration,
the sampling settings, ``max_new_tokens``) and by the argument shapes, so a
second call with the same settings and shapes (other prompts, prompt lengths,
parameters, key) does not recompile.

Another model family (a vision-language decoder, a Mamba LM) reuses the loop:
a :class:`DecodeFamily` says how to prepare its inputs, build its zero cache and
run one step, and :func:`run_decode_loop` runs it with :class:`DecodeSettings`,
after the same argument checks (``check_prompts``, ``check_sampling``,
``check_max_new_tokens``, ``check_cache_length``); ``effformer.models.solo`` and
``effformer.models.mamba_lm`` do so.

The cache holds ``cache_length`` positions (default: prompt width +
``max_new_tokens`` - 1, the positions that are fed); asking for more tokens
than it holds raises before anything runs, as does exceeding a learned
position table.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.models.transformer_lm import EncoderDecoderLM, TransformerLM

Array = jax.Array

# How often the decoding loop has been traced, per model family: a trace is a
# compilation, so tests count them to check that the compiled loop is reused.
_TRACES: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Result of generation.

    sequences: [B, P + N] every row's prompt followed by its generated tokens
      (a row with a shorter prompt continues further: it has P + N - length
      generated tokens).
    new_tokens: [B, N] the first N tokens generated after each row's prompt.
    logits: [B, P + N, V] (when asked for) ``logits[:, t]`` are the logits
      from which token t was chosen or, inside the prompt, that predicted it;
      ``logits[:, 0]`` is zeros.
    """

    sequences: Array
    new_tokens: Array
    logits: Array | None = None


def sample_logits(
    logits: Array, rng: Array, *, temperature: float = 0.0, top_k: int | None = None
) -> Array:
    """logits [B, V] -> tokens [B] int32: argmax when temperature is 0, else a sample.

    temperature: a finite number >= 0; top_k: None or an int in [1, V] (checked
    here too: a negative temperature would silently favour the least likely tokens).
    """
    if logits.ndim != 2:
        raise ValueError(f"sample_logits: logits must be [B, V], got shape {tuple(logits.shape)}.")
    check_sampling(temperature, top_k, logits.shape[-1], owner="sample_logits")
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        threshold = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------- argument checks


def check_sampling(
    temperature: float, top_k: int | None, vocab_size: int, *, owner: str = "generate"
) -> None:
    """Refuse a temperature that is not a finite number >= 0 (a bool, NaN, inf, negative)
    or a ``top_k`` outside [1, vocab_size]."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"{owner}: temperature must be a finite float >= 0, got {temperature!r}.")
    if top_k is not None and not (
        isinstance(top_k, numbers.Integral)
        and not isinstance(top_k, bool)
        and 1 <= top_k <= vocab_size
    ):
        raise ValueError(f"{owner}: top_k must be None or in [1, {vocab_size}], got {top_k!r}.")


def check_max_new_tokens(owner: str, max_new_tokens: Any) -> None:
    """Refuse anything but an int >= 1 (``owner`` names the caller in the message)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{owner}: max_new_tokens must be a positive int, got {max_new_tokens!r}.")


def check_prompts(prompts: Array, prompt_lengths: Any) -> np.ndarray:
    """prompts [B, P] int and prompt_lengths [B] (None: all P) -> the lengths as host ints."""
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(
            f"generate: prompts must be integer token ids [B, P] (right-padded), got shape "
            f"{tuple(prompts.shape)} and dtype {prompts.dtype}."
        )
    batch, width = prompts.shape
    if width < 1:
        raise ValueError(
            f"generate: prompts must hold at least one token per row (e.g. BOS), got shape "
            f"{tuple(prompts.shape)}."
        )
    if prompt_lengths is None:
        return np.full((batch,), width, np.int32)
    given = np.asarray(prompt_lengths)
    # A cast alone would turn 2.7 into 2 and True into 1: only whole numbers are lengths.
    numeric = given.dtype != bool and np.issubdtype(given.dtype, np.number)
    lengths = given.astype(np.int32) if numeric else np.zeros(given.shape, np.int32)
    if (
        not numeric
        or np.any(lengths != given)
        or lengths.shape != (batch,)
        or lengths.min(initial=1) < 1
        or lengths.max(initial=1) > width
    ):
        raise ValueError(
            f"generate: prompt_lengths must be [B={batch}] ints in [1, {width}] (every prompt "
            f"needs at least one token, e.g. BOS), got {given.tolist()}."
        )
    return lengths


def _check_prefix_lengths(
    model: TransformerLM, prefix_lengths: Any, prompt_lengths: np.ndarray
) -> np.ndarray | None:
    """The prefix LM's prefix of each row (default: its whole prompt); None for decoders."""
    if model.kind != "prefix_lm":
        if prefix_lengths is not None:
            raise ValueError(
                f"generate: prefix_lengths is only for kind='prefix_lm', got kind={model.kind!r}."
            )
        return None
    if prefix_lengths is None:
        return prompt_lengths
    prefixes = np.asarray(prefix_lengths)
    if (
        prefixes.shape != prompt_lengths.shape
        or not np.issubdtype(prefixes.dtype, np.integer)
        or np.any(prefixes < 0)
        or np.any(prefixes > prompt_lengths)
    ):
        raise ValueError(
            f"generate: prefix_lengths must be [B={prompt_lengths.shape[0]}] ints with 0 <= "
            f"prefix_length <= prompt_length (the prefix is part of the prompt; prompt_lengths "
            f"{prompt_lengths.tolist()}), got {prefixes.tolist()}."
        )
    return prefixes.astype(np.int32)


def _check_model_state(owner: str, model_state: Mapping[str, Any] | None) -> dict[str, Any]:
    state = dict(model_state or {})
    reserved = sorted({"params", "cache"} & set(state))
    if reserved:
        raise ValueError(
            f"{owner}: model_state holds the collections besides params and cache (e.g. "
            f"'hashing'); got {reserved} in it. Pass params on their own."
        )
    return state


def check_cache_length(cache_length: int | None, needed: int, max_positions: int | None) -> int:
    """The cache length to use (default ``needed``); refuses one too short for ``needed``
    positions, or ``needed`` past a learned position table of ``max_positions``."""
    if cache_length is None:
        cache_length = needed
    if cache_length < needed:
        raise ValueError(
            f"generate: the prompts and max_new_tokens need {needed} cached positions, more than "
            f"the cache_length {cache_length}."
        )
    if max_positions is not None and needed > max_positions:
        raise ValueError(
            f"generate: generation reaches position {needed}, past the learned position table "
            f"of max_length={max_positions}."
        )
    return cache_length


def _learned_table_length(model: Any) -> int | None:
    return model.max_length if model.position_encoding == "learned" else None


# ------------------------------------------------------------- static arguments of the loop


class _Identity:
    """Key part for an unhashable value: equal only to itself (held, so its id stays unique)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


def _freeze(value: Any) -> Any:
    """A hashable value, equal for equal configurations (modules, mappings, sequences)."""
    if isinstance(value, nn.Module):
        fields = dataclasses.fields(value)
        return (type(value), tuple((f.name, _freeze(getattr(value, f.name))) for f in fields
                                   if f.name != "parent"))  # fmt: skip
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda item: repr(item[0]))
        return (dict, tuple((key, _freeze(item)) for key, item in items))
    if isinstance(value, list | tuple):
        return (type(value), tuple(_freeze(item) for item in value))
    try:
        hash(value)
    except TypeError:
        return _Identity(value)
    return (type(value), value)  # the type keeps True apart from 1


class _StaticModule:
    """A Flax module as a static jit argument: hashed and compared by its configuration
    (Flax modules with dict fields, such as ``mixer_kwargs``, are not hashable)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._key = _freeze(module)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StaticModule) and other._key == self._key


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The static settings of one decoding loop."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    eos_id: int | None
    pad_id: int
    return_logits: bool


class DecodeFamily(NamedTuple):
    """How the loop prepares, caches and steps one model family.

    prepare(model, inputs) -> context; init_cache(model, context, batch) -> zero cache;
    step(model, context, cache, tokens [B, L], positions [B, L], prefix_lengths [B] | None)
    -> (logits [B, L, V], cache).
    """

    name: str
    prepare: Callable[..., Any]
    init_cache: Callable[..., Any]
    step: Callable[..., tuple[Array, Any]]


def zero_cache(init: Callable[..., Any], *args: Any) -> Any:
    """The zero ``cache`` collection of ``init(*args)`` (a ``model.init`` with decode=True),
    from its shapes only: nothing is initialised or compiled."""
    return zeros_like_shapes(jax.eval_shape(lambda *a: init(*a)["cache"], *args))


def _decoder_init_cache(model: TransformerLM, params: Any, batch: int) -> Any:
    one = jnp.zeros((batch, 1), jnp.int32)
    return zero_cache(lambda: model.init(jax.random.PRNGKey(0), one, positions=one, decode=True))


def _decoder_step(model: TransformerLM, variables, cache, tokens, positions, prefix_lengths):
    kwargs = {} if prefix_lengths is None else {"prefix_lengths": prefix_lengths}
    logits, mutated = model.apply(
        {**variables, "cache": cache},
        tokens,
        positions=positions,
        decode=True,
        mutable=["cache"],
        **kwargs,
    )
    return logits, mutated["cache"]


def _seq2seq_prepare(model: EncoderDecoderLM, inputs: tuple[Any, Array]) -> tuple[Any, ...]:
    variables, source = inputs  # variables: params and any collection besides the cache
    encoded, source_mask = model.apply(variables, source, method="encode")
    return variables, encoded, source_mask


def _seq2seq_init_cache(model: EncoderDecoderLM, context: tuple[Any, ...], batch: int) -> Any:
    _, encoded, source_mask = context
    one = jnp.zeros((batch, 1), jnp.int32)
    return zero_cache(
        lambda encoded, source_mask: model.init(
            jax.random.PRNGKey(0),
            one,
            encoded,
            source_mask,
            positions=one,
            decode=True,
            method="decode",
        ),
        encoded,
        source_mask,
    )


def _seq2seq_step(model: EncoderDecoderLM, context, cache, tokens, positions, prefix_lengths):
    del prefix_lengths  # the decoder of an encoder-decoder has none
    variables, encoded, source_mask = context
    logits, mutated = model.apply(
        {**variables, "cache": cache},
        tokens,
        encoded,
        source_mask,
        positions=positions,
        decode=True,
        method="decode",
        mutable=["cache"],
    )
    return logits, mutated["cache"]


# The decoder family's inputs are the model's variables without the cache: params
# and any other collection it reads (EcoFormer's hash functions).
_DECODER = DecodeFamily(
    "decoder", lambda model, variables: variables, _decoder_init_cache, _decoder_step
)
_SEQ2SEQ = DecodeFamily("seq2seq", _seq2seq_prepare, _seq2seq_init_cache, _seq2seq_step)


def _rewind(cache: Any, index: Array) -> Any:
    """Every attention cache's write index set to ``index``: the next call writes there."""

    def reset(path, leaf):
        if getattr(path[-1], "key", None) == "cache_index":
            return jnp.asarray(index, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(reset, cache)


# --------------------------------------------------------------------------- the loop


def _forced_prompt_loop(
    step: Callable[..., tuple[Array, Any]],
    context: Any,
    cache: Any,
    prompts: Array,
    prompt_lengths: Array,
    prefix_lengths: Array | None,
    rng: Array,
    loop: DecodeSettings,
    prefill_length: int | None,
) -> tuple[Array, Array, Array]:
    """The forced-prompt loop (module docstring), to be traced inside ``jax.jit``.

    step(context, cache, tokens [B, L], positions [B, L], prefix_lengths) -> (logits, cache).
    prefill_length: None: feed the whole prompt width in one call, then rewind the
    caches to the shortest prompt (attention caches only); an int: feed that many
    tokens first (at most the shortest prompt) and go on from there.
    Returns (tokens [B, P + N], new_tokens [B, N], scores [B, P + N, V] or [0]).
    """
    batch, width = prompts.shape
    new = loop.max_new_tokens
    total = width + new
    tokens = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, new)))
    prefill = width if prefill_length is None else prefill_length
    positions = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (batch, prefill))
    logits, cache = step(context, cache, tokens[:, :prefill], positions, prefix_lengths)
    if prefill_length is None:
        # Slots from the shortest prompt on are (re)written step by step: the prefill's
        # values there are right for rows still inside their prompt, padding for the others.
        start = jnp.min(prompt_lengths)
        cache = _rewind(cache, start)
    else:
        start = jnp.asarray(prefill_length, jnp.int32)
    vocab = logits.shape[-1]
    scores = jnp.zeros((batch, total, vocab) if loop.return_logits else (0,), jnp.float32)
    if loop.return_logits:
        scores = scores.at[:, 1 : prefill + 1].set(logits.astype(jnp.float32))
    last_logits = jax.lax.dynamic_index_in_dim(logits, start - 1, axis=1, keepdims=False)
    done = jnp.zeros((batch,), bool)

    def choose(t, last_logits, tokens, done):
        sampled = sample_logits(
            last_logits,
            jax.random.fold_in(rng, t),
            temperature=loop.temperature,
            top_k=loop.top_k,
        )
        in_prompt = t < prompt_lengths
        if loop.eos_id is not None:
            sampled = jnp.where(done, loop.pad_id, sampled)
            done = done | (~in_prompt & (sampled == loop.eos_id))
        token = jnp.where(in_prompt, tokens[:, t], sampled)
        return tokens.at[:, t].set(token), done

    def body(t, carry):
        cache, last_logits, tokens, done, scores = carry
        tokens, done = choose(t, last_logits, tokens, done)
        token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
        positions = jnp.full((batch, 1), t, jnp.int32)
        logits, cache = step(context, cache, token, positions, prefix_lengths)
        logits = logits[:, 0]
        if loop.return_logits:
            scores = jax.lax.dynamic_update_slice_in_dim(
                scores, logits[:, None].astype(jnp.float32), t + 1, axis=1
            )
        return cache, logits, tokens, done, scores

    carry = (cache, last_logits, tokens, done, scores)
    _, last_logits, tokens, done, scores = jax.lax.fori_loop(start, total - 1, body, carry)
    tokens, done = choose(total - 1, last_logits, tokens, done)
    offsets = prompt_lengths[:, None] + jnp.arange(new)[None, :]
    new_tokens = jnp.take_along_axis(tokens, offsets, axis=1)
    return tokens, new_tokens, scores


@functools.partial(jax.jit, static_argnames=("family", "model", "loop", "prefill_length"))
def _generate_loop(
    inputs: Any,
    prompts: Array,
    prompt_lengths: Array,
    prefix_lengths: Array | None,
    rng: Array,
    *,
    family: DecodeFamily,
    model: _StaticModule,
    loop: DecodeSettings,
    prefill_length: int | None,
) -> tuple[Array, Array, Array]:
    """Encode (seq2seq), make the zero cache and run the loop: compiled once per static
    arguments and argument shapes. ``prefill_length``: see ``_forced_prompt_loop`` (None:
    the prompt width in one call, for attention-only models)."""
    _TRACES[family.name] += 1
    module = model.module
    context = family.prepare(module, inputs)
    cache = family.init_cache(module, context, prompts.shape[0])
    step = functools.partial(family.step, module)
    return _forced_prompt_loop(
        step,
        context,
        cache,
        prompts,
        prompt_lengths,
        prefix_lengths,
        rng,
        loop,
        prefill_length,
    )


def zeros_like_shapes(tree: Any) -> Any:
    """Zeros of every ``ShapeDtypeStruct`` of ``tree``."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def run_decode_loop(
    family: DecodeFamily,
    model: nn.Module,
    inputs: Any,
    prompts: Array,
    lengths: np.ndarray,
    prefixes: np.ndarray | None,
    rng: Array | None,
    loop: DecodeSettings,
    prefill_length: int | None,
) -> GenerateOutput:
    """Run the compiled loop of ``family`` (cached per static settings and shapes).

    model: the module the family's functions receive (its configuration is part of
    the compiled loop's key); inputs: what ``family.prepare`` turns into the step's
    context (traced: new values reuse the compiled loop); prompts [B, P] right-padded
    with ``lengths`` [B] host ints (``check_prompts``); prefixes: a prefix LM's
    [B] prefix lengths or None; rng: the sampling key (None: greedy's unused key).
    prefill_length: None feeds the whole prompt width in one call (attention-only
    models); an int feeds that many tokens first (at most the shortest prompt).
    """
    tokens, new_tokens, scores = _generate_loop(
        inputs,
        jnp.asarray(prompts),
        jnp.asarray(lengths),
        None if prefixes is None else jnp.asarray(prefixes),
        jax.random.PRNGKey(0) if rng is None else rng,
        family=family,
        model=_StaticModule(model),
        loop=loop,
        prefill_length=prefill_length,
    )
    return GenerateOutput(tokens, new_tokens, scores if loop.return_logits else None)


# ------------------------------------------------------------------------ public entry points


def generate(
    model: TransformerLM,
    params: Any,
    prompts: Array,
    prompt_lengths: Any = None,
    *,
    max_new_tokens: int,
    prefix_lengths: Any = None,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    cache_length: int | None = None,
    return_logits: bool = False,
    model_state: Mapping[str, Any] | None = None,
) -> GenerateOutput:
    """Continue right-padded ``prompts [B, P]`` of ``prompt_lengths [B]`` by a decoder or prefix LM.

    Args:
      model: a ``TransformerLM`` with ``kind="decoder"`` or ``kind="prefix_lm"``
        (a prefix LM must have attention layers only).
      params: its parameters (``variables["params"]``).
      prompts: [B, P] int, right-padded; prompt_lengths: [B] host ints in [1, P]
        (default: all P).
      max_new_tokens: N >= 1 tokens generated after each row's prompt.
      prefix_lengths: prefix LM only: [B] host ints, the bidirectional prefix of
        each row, ``0 <= prefix_length <= prompt_length`` (default: the whole prompt).
      rng: key for sampling (unused when greedy).
      temperature, top_k: sampling (see :func:`sample_logits`).
      eos_id: after a row generates it, its later generated tokens are ``pad_id``.
      cache_length: KV-cache positions; default exactly the P + N - 1 needed.
      return_logits: also return the logits of every position.
      model_state: the model's variable collections besides ``params`` and ``cache``
        (a trained run's ``model_state``, e.g. EcoFormer's ``hashing``), read, never
        changed.
    """
    if not isinstance(model, TransformerLM) or model.kind not in ("decoder", "prefix_lm"):
        raise ValueError(
            f"generate: model must be a TransformerLM with kind='decoder' or 'prefix_lm', got "
            f"{type(model).__name__}"
            f"{'' if not isinstance(model, TransformerLM) else f' kind={model.kind!r}'}."
        )
    check_max_new_tokens("generate", max_new_tokens)
    check_sampling(temperature, top_k, model.vocab_size)
    lengths = check_prompts(prompts, prompt_lengths)
    prefixes = _check_prefix_lengths(model, prefix_lengths, lengths)
    chunked = model.supports_chunked_decode
    if model.kind == "prefix_lm" and not chunked:
        raise ValueError(
            "generate: a prefix LM decodes its prefix in one call, so every layer must be "
            f"attention (global, local:W, block:B), got layer_pattern={model.layer_pattern!r}, "
            f"layer_overrides={model.layer_overrides!r}."
        )
    needed = prompts.shape[1] + max_new_tokens - 1
    cache_length = check_cache_length(cache_length, needed, _learned_table_length(model))
    loop = DecodeSettings(max_new_tokens, float(temperature), top_k, eos_id, pad_id, return_logits)
    variables = {"params": params, **_check_model_state("generate", model_state)}
    decoder = model.clone(max_decode_length=cache_length)
    return run_decode_loop(
        _DECODER, decoder, variables, prompts, lengths, prefixes, rng, loop, None if chunked else 1
    )


def generate_seq2seq(
    model: EncoderDecoderLM,
    params: Any,
    inputs: Array,
    *,
    max_new_tokens: int,
    decoder_prompts: Array | None = None,
    decoder_prompt_lengths: Any = None,
    decoder_start_id: int = 0,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    cache_length: int | None = None,
    return_logits: bool = False,
    model_state: Mapping[str, Any] | None = None,
) -> GenerateOutput:
    """Decode targets for ``inputs [B, Ls]`` with an encoder-decoder.

    The source is encoded once, inside the compiled loop; the decoder starts
    from ``decoder_prompts`` (right-padded, default one ``decoder_start_id``
    token per row, the BOS of the ``seq2seq`` task) and keeps a KV cache of
    its self-attention. Other arguments (``model_state`` included) as in
    :func:`generate`.
    """
    if not isinstance(model, EncoderDecoderLM):
        raise ValueError(
            f"generate_seq2seq: model must be an EncoderDecoderLM, got {type(model).__name__}."
        )
    check_max_new_tokens("generate_seq2seq", max_new_tokens)
    check_sampling(temperature, top_k, model.vocab_size)
    batch = inputs.shape[0]
    if decoder_prompts is None:
        decoder_prompts = jnp.full((batch, 1), decoder_start_id, jnp.int32)
    lengths = check_prompts(decoder_prompts, decoder_prompt_lengths)
    if decoder_prompts.shape[0] != batch:
        raise ValueError(
            f"generate_seq2seq: decoder_prompts batch must equal inputs batch {batch}, got "
            f"{decoder_prompts.shape[0]}."
        )
    needed = decoder_prompts.shape[1] + max_new_tokens - 1
    cache_length = check_cache_length(cache_length, needed, _learned_table_length(model))
    loop = DecodeSettings(max_new_tokens, float(temperature), top_k, eos_id, pad_id, return_logits)
    seq2seq = model.clone(max_decode_length=cache_length)
    variables = {"params": params, **_check_model_state("generate_seq2seq", model_state)}
    source = (variables, jnp.asarray(inputs))
    return run_decode_loop(
        _SEQ2SEQ, seq2seq, source, decoder_prompts, lengths, None, rng, loop,
        None if model.supports_chunked_decode else 1,
    )  # fmt: skip
