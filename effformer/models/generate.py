"""Autoregressive generation with a KV cache (and Mamba's recurrent state).

:func:`generate` runs a decoder (:class:`~effformer.models.transformer_lm.TransformerLM`
with ``kind="decoder"``, any mix of attention and Mamba layers);
:func:`generate_seq2seq` encodes the source once and runs the decoder of an
:class:`~effformer.models.transformer_lm.EncoderDecoderLM`. Both decode greedily
(``temperature=0``) or sample from ``softmax(logits / temperature)``,
optionally restricted to the ``top_k`` most likely tokens.

Prompts of different lengths share one batch, **right-padded**, with their
lengths given. Every row is decoded from position 0 in lock-step, so all rows
share one cache index and position t is slot t of every cache: the shortest
prompt is prefilled in one call (token by token when the model has Mamba
layers, which advance one step per call), then each step feeds, for every
row, its own prompt token while the row is still inside its prompt and the
token sampled from the previous step's logits after it (the "forced prompt"
scheme). No padding ever enters a cache, so no mask is needed.

The cache holds ``cache_length`` positions (default: prompt width +
``max_new_tokens`` - 1, the positions that are fed); asking for more tokens
than it holds raises before anything runs, as does exceeding a learned
position table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effformer.models.transformer_lm import EncoderDecoderLM, TransformerLM

Array = jax.Array
StepFn = Callable[[Any, Any, Array, Array], tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Result of generation.

    sequences: [B, P + N] every row's prompt followed by its generated tokens
      (a row with a shorter prompt continues further: it has P + N - length
      generated tokens).
    new_tokens: [B, N] the first N tokens generated after each row's prompt.
    logits: [B, P + N, V] (when asked for) ``logits[:, t]`` are the logits
      from which token t was chosen or, inside the prompt, that predicted it;
      row 0 is zeros.
    """

    sequences: Array
    new_tokens: Array
    logits: Array | None = None


def sample_logits(
    logits: Array, rng: Array, *, temperature: float = 0.0, top_k: int | None = None
) -> Array:
    """logits [B, V] -> tokens [B] int32: argmax when temperature is 0, else a sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        threshold = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, vocab_size: int) -> None:
    if not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(f"generate: temperature must be a float >= 0, got {temperature!r}.")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab_size):
        raise ValueError(f"generate: top_k must be None or in [1, {vocab_size}], got {top_k!r}.")


def _check_prompts(prompts: Array, prompt_lengths: Any) -> np.ndarray:
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(
            f"generate: prompts must be integer token ids [B, P] (right-padded), got shape "
            f"{tuple(prompts.shape)} and dtype {prompts.dtype}."
        )
    batch, width = prompts.shape
    lengths = (
        np.full((batch,), width, np.int32)
        if prompt_lengths is None
        else np.asarray(prompt_lengths, np.int32)
    )
    if lengths.shape != (batch,) or lengths.min(initial=1) < 1 or lengths.max(initial=1) > width:
        raise ValueError(
            f"generate: prompt_lengths must be [B={batch}] ints in [1, {width}] (every prompt "
            f"needs at least one token, e.g. BOS), got {lengths.tolist()}."
        )
    return lengths


def _check_cache_length(cache_length: int | None, needed: int, max_positions: int | None) -> int:
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


def _zeros_like_shapes(tree: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _decode_loop(
    step: StepFn,
    context: Any,
    cache: Any,
    prompts: Array,
    lengths: np.ndarray,
    rng: Array,
    *,
    max_new_tokens: int,
    prefill_length: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    pad_id: int,
    return_logits: bool,
) -> GenerateOutput:
    """The forced-prompt loop shared by decoders and encoder-decoders (jit-compiled)."""
    batch, width = prompts.shape
    total = width + max_new_tokens
    prompt_lengths = jnp.asarray(lengths)

    @jax.jit
    def run(context, cache, prompts, prompt_lengths, rng):
        tokens = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, max_new_tokens)))
        positions = jnp.broadcast_to(
            jnp.arange(prefill_length, dtype=jnp.int32), (batch, prefill_length)
        )
        logits, cache = step(context, cache, tokens[:, :prefill_length], positions)
        vocab = logits.shape[-1]
        scores = jnp.zeros((batch, total, vocab) if return_logits else (0,), jnp.float32)
        if return_logits:
            scores = scores.at[:, 1 : prefill_length + 1].set(logits.astype(jnp.float32))
        done = jnp.zeros((batch,), bool)

        def choose(t, last_logits, tokens, done):
            sampled = sample_logits(
                last_logits, jax.random.fold_in(rng, t), temperature=temperature, top_k=top_k
            )
            in_prompt = t < prompt_lengths
            if eos_id is not None:
                sampled = jnp.where(done, pad_id, sampled)
                done = done | (~in_prompt & (sampled == eos_id))
            token = jnp.where(in_prompt, tokens[:, t], sampled)
            return tokens.at[:, t].set(token), done

        def body(t, carry):
            cache, last_logits, tokens, done, scores = carry
            tokens, done = choose(t, last_logits, tokens, done)
            token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
            logits, cache = step(context, cache, token, jnp.full((batch, 1), t, jnp.int32))
            logits = logits[:, 0]
            if return_logits:
                scores = jax.lax.dynamic_update_slice_in_dim(
                    scores, logits[:, None].astype(jnp.float32), t + 1, axis=1
                )
            return cache, logits, tokens, done, scores

        carry = (cache, logits[:, -1], tokens, done, scores)
        cache, last_logits, tokens, done, scores = jax.lax.fori_loop(
            prefill_length, total - 1, body, carry
        )
        tokens, done = choose(total - 1, last_logits, tokens, done)
        offsets = prompt_lengths[:, None] + jnp.arange(max_new_tokens)[None, :]
        new_tokens = jnp.take_along_axis(tokens, offsets, axis=1)
        return tokens, new_tokens, scores

    sequences, new_tokens, scores = run(context, cache, prompts, prompt_lengths, rng)
    return GenerateOutput(sequences, new_tokens, scores if return_logits else None)


def _learned_table_length(model: Any) -> int | None:
    return model.max_length if model.position_encoding == "learned" else None


def generate(
    model: TransformerLM,
    params: Any,
    prompts: Array,
    prompt_lengths: Any = None,
    *,
    max_new_tokens: int,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    cache_length: int | None = None,
    return_logits: bool = False,
) -> GenerateOutput:
    """Continue right-padded ``prompts [B, P]`` of ``prompt_lengths [B]`` by a decoder.

    Args:
      model: a ``TransformerLM`` with ``kind="decoder"``.
      params: its parameters (``variables["params"]``).
      prompts: [B, P] int, right-padded; prompt_lengths: [B] host ints in [1, P]
        (default: all P).
      max_new_tokens: N >= 1 tokens generated after each row's prompt.
      rng: key for sampling (unused when greedy).
      temperature, top_k: sampling (see :func:`sample_logits`).
      eos_id: after a row generates it, its later generated tokens are ``pad_id``.
      cache_length: KV-cache positions; default exactly the P + N - 1 needed.
      return_logits: also return the logits of every position.
    """
    if not isinstance(model, TransformerLM) or model.kind != "decoder":
        raise ValueError(
            f"generate: model must be a TransformerLM with kind='decoder', got {type(model).__name__}"
            f"{'' if not isinstance(model, TransformerLM) else f' kind={model.kind!r}'}."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}."
        )
    _check_sampling(temperature, top_k, model.vocab_size)
    lengths = _check_prompts(prompts, prompt_lengths)
    batch, width = prompts.shape
    needed = width + max_new_tokens - 1
    cache_length = _check_cache_length(cache_length, needed, _learned_table_length(model))
    decoder = model.clone(max_decode_length=cache_length)
    one = jnp.zeros((batch, 1), jnp.int32)
    cache_shapes = jax.eval_shape(
        lambda: decoder.init(jax.random.PRNGKey(0), one, positions=one, decode=True)["cache"]
    )

    def step(params, cache, tokens, positions):
        logits, mutated = decoder.apply(
            {"params": params, "cache": cache},
            tokens,
            positions=positions,
            decode=True,
            mutable=["cache"],
        )
        return logits, mutated["cache"]

    prefill = int(lengths.min()) if model.supports_chunked_decode else 1
    return _decode_loop(
        step,
        params,
        _zeros_like_shapes(cache_shapes),
        prompts,
        lengths,
        jax.random.PRNGKey(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        prefill_length=prefill,
        temperature=float(temperature),
        top_k=top_k,
        eos_id=eos_id,
        pad_id=pad_id,
        return_logits=return_logits,
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
) -> GenerateOutput:
    """Decode targets for ``inputs [B, Ls]`` with an encoder-decoder.

    The source is encoded once; the decoder starts from ``decoder_prompts``
    (right-padded, default one ``decoder_start_id`` token per row, the BOS of
    the ``seq2seq`` task) and keeps a KV cache of its self-attention. Other
    arguments as in :func:`generate`.
    """
    if not isinstance(model, EncoderDecoderLM):
        raise ValueError(
            f"generate_seq2seq: model must be an EncoderDecoderLM, got {type(model).__name__}."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"generate_seq2seq: max_new_tokens must be a positive int, got {max_new_tokens!r}."
        )
    _check_sampling(temperature, top_k, model.vocab_size)
    batch = inputs.shape[0]
    if decoder_prompts is None:
        decoder_prompts = jnp.full((batch, 1), decoder_start_id, jnp.int32)
    lengths = _check_prompts(decoder_prompts, decoder_prompt_lengths)
    if decoder_prompts.shape[0] != batch:
        raise ValueError(
            f"generate_seq2seq: decoder_prompts batch must equal inputs batch {batch}, got "
            f"{decoder_prompts.shape[0]}."
        )
    width = decoder_prompts.shape[1]
    needed = width + max_new_tokens - 1
    cache_length = _check_cache_length(cache_length, needed, _learned_table_length(model))
    seq2seq = model.clone(max_decode_length=cache_length)
    encoded, source_mask = seq2seq.apply({"params": params}, inputs, method="encode")
    one = jnp.zeros((batch, 1), jnp.int32)
    cache_shapes = jax.eval_shape(
        lambda: seq2seq.init(
            jax.random.PRNGKey(0),
            one,
            encoded,
            source_mask,
            positions=one,
            decode=True,
            method="decode",
        )["cache"]
    )

    def step(context, cache, tokens, positions):
        params, encoded, source_mask = context
        logits, mutated = seq2seq.apply(
            {"params": params, "cache": cache},
            tokens,
            encoded,
            source_mask,
            positions=positions,
            decode=True,
            method="decode",
            mutable=["cache"],
        )
        return logits, mutated["cache"]

    prefill = int(lengths.min()) if model.supports_chunked_decode else 1
    return _decode_loop(
        step,
        (params, encoded, source_mask),
        _zeros_like_shapes(cache_shapes),
        decoder_prompts,
        lengths,
        jax.random.PRNGKey(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        prefill_length=prefill,
        temperature=float(temperature),
        top_k=top_k,
        eos_id=eos_id,
        pad_id=pad_id,
        return_logits=return_logits,
    )
