"""Step-by-step (streaming) inference of a trained LMUFormer, non-spiking or spiking.

LMUFormer's LMU blocks, 1x1 convolutions, BatchNorm in evaluation mode and LIF neurons
are causal, but its patch embedding is not: ``num_conv_layers`` centred kernel-3
convolutions and the kernel-3 position convolution (padding 1 each), so the token at
position t reads inputs up to ``t + delay`` with ``delay = num_conv_layers + 1`` (5 in
the original). The paper's sequential mode pays this as a delay, and so does this
module: every convolution keeps a buffer of its last two inputs and emits its output
for position p - 1 when its input for position p arrives, one step behind the
convolution before it. After input step n (0-based) the model has the tokens
``0 .. n - delay``; each goes through the blocks at once (LMU memory
``m = Abar m + Bbar u`` by :func:`effformer.ops.legendre_memory.legendre_step`, LIF
membranes by :func:`effformer.ops.lif.lif_step`, BatchNorm with the running statistics).

The prediction after step n is what the original's sequential evaluation
(``test_mode='all_seq'`` of its ``ConvLMU``) outputs: the running mean of the
per-position logits of the tokens so far,

    logits_n = mean_{s <= n - delay} W_head h_s + b_head,

where ``h_s`` are the final features of the parallel model (for the spiking model the
head LIF's spikes). Those tokens read inputs up to step n only, so ``logits_n`` equals
the running mean of the parallel model's per-position logits (``per_position=True``)
of *any* sequence that starts with the inputs seen so far: the original's ``all_seq``
value at index ``n - delay``. Before the first token (n < delay) the prediction is the
head's bias (no token averaged; :func:`stream_step` also returns the count).

The zero padding of the convolutions is kept exactly: the left padding is the buffers'
initial zeros, and :func:`stream_flush` ends a stream by feeding every convolution its
right padding (zeros at the positions past the last input) for ``delay`` more ticks.
The flushed logits equal the parallel model's logits on the inputs consumed, run as a
sequence of that length (``model.apply(variables, inputs[:, :n + 1])``): the answer
of a model stopped after n + 1 steps.

Inference only (BatchNorm in evaluation mode; no ``batch_stats`` updates). Computes
in the inputs' dtype promoted to float32 (float64 inputs give float64 throughout),
whatever the model's ``dtype``. One state serves a batch of streams advanced together.
The equalities above hold to rounding; in float32 a spike of the spiking model can flip
where a membrane lies within rounding of its threshold (the one-position convolutions
here and XLA's convolution round differently): experiments/mamba/README.md measured 1 test
image in 360 whose logits moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from effformer.models.lmuformer import LMUFormer
from effformer.models.mamba_classifier import as_step_sequence
from effformer.ops.legendre_memory import discretised_state_space, legendre_step
from effformer.ops.lif import lif_step

Array = jax.Array
State = dict[str, Any]

_EPSILON = 1e-5  # BatchNorm's, as lmuformer._batch_norm


def stream_delay(model: LMUFormer) -> int:
    """Steps the stream's tokens lag its inputs: ``num_conv_layers + 1`` (5 in the original)."""
    _check_model("stream_delay", model)
    return model.num_conv_layers + 1


def _check_model(owner: str, model: Any) -> None:
    if not isinstance(model, LMUFormer):
        raise ValueError(f"{owner}: model must be an LMUFormer, got {type(model).__name__}.")
    for field in ("num_classes", "embed_dim", "num_layers", "num_conv_layers"):
        value = getattr(model, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: model.{field} must be a positive int, got {value!r}.")


def _check_variables(owner: str, variables: Any) -> None:
    if not isinstance(variables, Mapping) or not {"params", "batch_stats"} <= set(variables):
        keys = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            f"{owner}: variables must hold 'params' and 'batch_stats' (a trained LMUFormer's "
            f"variables), got {keys}."
        )


def _order(model: LMUFormer) -> int:
    return model.order or (2 * model.embed_dim if model.spiking else model.embed_dim)


def _lif_widths(model: LMUFormer) -> dict[str, int]:
    """The spiking model's LIF layers (their paths in ``variables``) and widths."""
    width, hidden = model.embed_dim, int(model.embed_dim * model.mlp_ratio)
    widths = {f"tokenizer/lif_{i}": width for i in range(model.num_conv_layers)}
    for i in range(model.num_layers):
        lmu, ffn = f"block_{i}_lmu", f"block_{i}_ffn"
        widths.update({f"{lmu}/input_lif": width, f"{lmu}/memory_input_lif": 1})
        widths.update({f"{lmu}/memory_lif": _order(model), f"{lmu}/hidden_lif": width})
        widths.update({f"{ffn}/lif1": width, f"{ffn}/lif2": hidden})
    widths["head_lif"] = width
    return widths


def init_stream(model: LMUFormer, batch_size: int, dtype: jnp.dtype | type = jnp.float32) -> State:
    """The state before the first step of ``batch_size`` streams (every buffer and membrane 0).

    State: ``clock`` (ticks run) and ``consumed`` (inputs taken), int32 scalars;
    ``conv`` [num_conv_layers + 1] buffers [B, 2, width] of the convolutions' last two
    inputs; ``residual`` [B, D] (the position convolution's input one step back);
    ``memory`` [num_layers] LMU states [B, order]; ``lif`` membranes [B, width] by layer
    path (spiking only); ``total`` [B, D] and ``tokens`` (int32): the sum and count of the
    final features averaged so far. Floats in ``dtype`` promoted to float32.
    """
    _check_model("init_stream", model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"init_stream: batch_size must be a positive int, got {batch_size!r}.")
    dtype = jnp.promote_types(dtype, jnp.float32)
    width = model.embed_dim
    zeros = lambda *shape: jnp.zeros((batch_size, *shape), dtype)  # noqa: E731
    state: State = {
        "clock": jnp.zeros((), jnp.int32),
        "consumed": jnp.zeros((), jnp.int32),
        "conv": [zeros(2, model.channels)] + [zeros(2, width)] * model.num_conv_layers,
        "residual": zeros(width),
        "memory": [zeros(_order(model))] * model.num_layers,
        "total": zeros(width),
        "tokens": jnp.zeros((), jnp.int32),
    }
    if model.spiking:
        state["lif"] = {name: zeros(w) for name, w in _lif_widths(model).items()}
    return state


class _Net:
    """One position of every layer, reading a trained model's variables by name."""

    def __init__(self, model: LMUFormer, variables: Mapping[str, Any], dtype: jnp.dtype):
        self.model, self.dtype = model, dtype
        self.params, self.stats = variables["params"], variables["batch_stats"]
        self.lif_state: dict[str, Array] = {}
        self.valid: Array | None = None  # whether the current position is real (scalar)

    def _get(self, tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
        for key in path.split("/"):
            tree = tree[key]
        return tree

    def dense(self, x: Array, path: str) -> Array:
        p = self._get(self.params, path)
        return x @ p["kernel"].astype(self.dtype) + p["bias"].astype(self.dtype)

    def conv(self, window: Array, path: str) -> Array:
        """window [B, 3, C] (positions p - 2, p - 1, p) -> the conv's output at p - 1."""
        kernel = self._get(self.params, path)["kernel"].astype(self.dtype)  # [3, C, D]
        return jnp.einsum("bkc,kcd->bd", window, kernel)

    def norm(self, x: Array, path: str) -> Array:
        """BatchNorm with the running statistics (flax's evaluation formula)."""
        p, s = self._get(self.params, path), self._get(self.stats, path)
        mean, var = s["mean"], s["var"]
        scale = lax.rsqrt(var + _EPSILON) * p["scale"]
        return ((x - mean) * scale + p["bias"]).astype(self.dtype)

    def fire(self, x: Array, norm: str, lif: str, v_threshold: float = 1.0) -> Array:
        """LIF(BN(x)) for one position; the membrane moves only where the position is real."""
        v = self.lif_state[lif]
        v_next, spikes = lif_step(v, self.norm(x, norm), tau=2.0, v_threshold=v_threshold)
        self.lif_state[lif] = jnp.where(self.valid, v_next.astype(self.dtype), v)
        return spikes.astype(self.dtype)


def _tick(model: LMUFormer, variables: Mapping[str, Any], state: State, x_t: Array | None) -> State:
    """One clock tick: take input ``x_t`` [B, channels] (None: a right-padding tick)."""
    dtype = state["total"].dtype
    net = _Net(model, variables, dtype)
    net.lif_state = dict(state.get("lif", {}))
    clock = state["clock"]
    consumed = state["consumed"] + (0 if x_t is None else 1)
    layers = model.num_conv_layers
    # Stage k (conv_k, then position_conv for k = layers) takes its input for position
    # clock - k: the raw input, or the previous stage's output, one tick behind it.
    value = jnp.zeros_like(state["conv"][0][:, 0]) if x_t is None else x_t.astype(dtype)
    conv_buffers = []
    for k in range(layers + 1):
        position = clock - k
        net.valid = (position >= 0) & (position < consumed)
        stream = value  # the real-valued residual stream (used by the position stage)
        if model.spiking and k > 0:
            value = net.fire(value, f"tokenizer/norm_{k - 1}", f"tokenizer/lif_{k - 1}")
        value = jnp.where(net.valid, value, 0)  # the convolution's zero padding
        window = jnp.concatenate([state["conv"][k], value[:, None]], axis=1)
        conv_buffers.append(window[:, 1:])
        if k < layers:
            value = net.conv(window, f"tokenizer/conv_{k}")  # position - 1
            if not model.spiking:
                value = net.norm(jax.nn.relu(value), f"tokenizer/norm_{k}")
        else:
            value = state["residual"] + net.conv(window, "tokenizer/position_conv")
            residual = jnp.where(net.valid, stream, 0)
    token = clock - layers - 1
    net.valid = (token >= 0) & (token < consumed)
    x = value
    memories = []
    for i in range(model.num_layers):
        x, memory = _block(model, net, x, state["memory"][i], i)
        memories.append(jnp.where(net.valid, memory, state["memory"][i]))
    if model.spiking:
        x = net.fire(x, "head_norm", "head_lif")
    new_state = {
        "clock": clock + 1,
        "consumed": consumed,
        "conv": conv_buffers,
        "residual": residual,
        "memory": memories,
        "total": state["total"] + jnp.where(net.valid, x, 0),
        "tokens": state["tokens"] + net.valid.astype(jnp.int32),
    }
    if model.spiking:
        new_state["lif"] = net.lif_state
    return new_state


def _logits(variables: Mapping[str, Any], state: State) -> Array:
    """The head of the mean of the features so far (its bias before the first token)."""
    mean = state["total"] / jnp.maximum(state["tokens"], 1).astype(state["total"].dtype)
    head = variables["params"]["head"]
    dtype = state["total"].dtype
    return mean @ head["kernel"].astype(dtype) + head["bias"].astype(dtype)


def _check_state(owner: str, model: LMUFormer, state: Any) -> None:
    if not isinstance(state, Mapping) or "conv" not in state or "total" not in state:
        raise ValueError(f"{owner}: state must come from init_stream or stream_step.")
    expected = jax.tree.structure(init_stream(model, 1))
    if jax.tree.structure(state) != expected:
        raise ValueError(
            f"{owner}: state does not fit this model (spiking={model.spiking}, "
            f"num_layers={model.num_layers}, num_conv_layers={model.num_conv_layers}); "
            "make it with init_stream(model, ...)."
        )


def stream_step(
    model: LMUFormer, variables: Mapping[str, Any], state: State, x_t: Array
) -> tuple[State, Array, Array]:
    """Take one input step of every stream: ``x_t [B, channels]`` (one pixel for images).

    Returns (the new state, logits [B, num_classes], tokens): the prediction after this
    step, the running mean of the per-position logits of the ``tokens`` tokens so far
    (after n + 1 steps, ``max(0, n + 1 - delay)``: :func:`stream_delay`). Works under
    ``jit`` and ``lax.scan`` with ``model`` static.
    """
    _check_model("stream_step", model)
    _check_variables("stream_step", variables)
    _check_state("stream_step", model, state)
    batch = state["total"].shape[0]
    if x_t.ndim != 2 or tuple(x_t.shape) != (batch, model.channels):
        raise ValueError(
            f"stream_step: x_t must have shape [B={batch}, channels={model.channels}] (one "
            f"step of the state's {batch} streams), got {tuple(x_t.shape)}."
        )
    if not jnp.issubdtype(x_t.dtype, jnp.floating):
        raise ValueError(f"stream_step: x_t must be floating point, got {x_t.dtype}.")
    state = _tick(model, variables, state, x_t)
    return state, _logits(variables, state), state["tokens"]


def stream_flush(model: LMUFormer, variables: Mapping[str, Any], state: State) -> Array:
    """End the streams: run ``delay`` ticks of right padding; logits [B, num_classes].

    They equal the parallel model's logits on the inputs consumed, as a sequence of that
    length (module docstring). The state is not returned: a flushed stream is over.
    """
    _check_model("stream_flush", model)
    _check_variables("stream_flush", variables)
    _check_state("stream_flush", model, state)
    for _ in range(stream_delay(model)):
        state = _tick(model, variables, state, None)
    return _logits(variables, state)


def stream_predictions(
    model: LMUFormer, variables: Mapping[str, Any], inputs: Array, *, flush_each_step: bool = False
) -> tuple[Array, Array | None]:
    """Stream whole sequences step by step (``lax.scan``); the prediction after every step.

    Args:
      model, variables: a trained LMUFormer (evaluation mode).
      inputs: signals [B, L, C] or images [B, H, W, C] (read pixel by pixel), as the model.
      flush_each_step: also end a copy of the streams after every step (``delay`` more
        ticks each, so about ``delay + 1`` times the work).
    Returns:
      (logits [B, L, num_classes]: the prediction after steps 0 .. L - 1;
      flushed [B, L, num_classes]: after each step, the logits of the streams ended
      there, i.e. of the parallel model on the prefix of that length; None unless
      ``flush_each_step``).
    """
    _check_model("stream_predictions", model)
    _check_variables("stream_predictions", variables)
    steps = as_step_sequence("stream_predictions", inputs, model.image_size, model.channels)
    if not jnp.issubdtype(steps.dtype, jnp.floating):
        raise ValueError(f"stream_predictions: inputs must be floating point, got {steps.dtype}.")
    state = init_stream(model, steps.shape[0], steps.dtype)

    def step(state, x_t):
        state, logits, _ = stream_step(model, variables, state, x_t)
        flushed = stream_flush(model, variables, state) if flush_each_step else None
        return state, (logits, flushed)

    _, (logits, flushed) = lax.scan(step, state, jnp.swapaxes(steps, 0, 1))
    logits = jnp.swapaxes(logits, 0, 1)
    return logits, None if flushed is None else jnp.swapaxes(flushed, 0, 1)


def _block(model: LMUFormer, net: _Net, x: Array, memory: Array, i: int) -> tuple[Array, Array]:
    """Block i at one token x [B, D] with LMU state ``memory`` [B, order] -> (x, new state)."""
    order = _order(model)
    f32 = jnp.promote_types(net.dtype, jnp.float32)
    Abar, Bbar = (jnp.asarray(a, f32) for a in discretised_state_space(order, model.theta))
    lmu, ffn = f"block_{i}_lmu", f"block_{i}_ffn"
    if model.spiking:
        s = net.fire(x, f"{lmu}/input_norm", f"{lmu}/input_lif", v_threshold=0.5)
        u = net.fire(
            net.dense(s, f"{lmu}/memory_input"),
            f"{lmu}/memory_input_norm",
            f"{lmu}/memory_input_lif",
        )
        memory = legendre_step(memory[:, None], u, Abar, Bbar)[:, 0]
        m = net.fire(memory, f"{lmu}/memory_norm", f"{lmu}/memory_lif")
        hidden = net.dense(jnp.concatenate([m, s], axis=-1), f"{lmu}/hidden")
        h = net.fire(hidden, f"{lmu}/hidden_norm", f"{lmu}/hidden_lif")
        x = x + net.norm(net.dense(h, f"{lmu}/out_proj"), f"{lmu}/out_norm")
        y = net.dense(net.fire(x, f"{ffn}/norm1", f"{ffn}/lif1"), f"{ffn}/fc1")
        return x + net.dense(net.fire(y, f"{ffn}/norm2", f"{ffn}/lif2"), f"{ffn}/fc2"), memory
    u = jax.nn.relu(net.dense(x, f"{lmu}/memory_input"))  # [B, 1]: one memory channel
    memory = legendre_step(memory[:, None], u, Abar, Bbar)[:, 0]
    hidden = jax.nn.relu(net.dense(jnp.concatenate([memory, x], axis=-1), f"{lmu}/hidden"))
    x = x + net.norm(net.dense(hidden, f"{lmu}/out_proj"), f"block_{i}_lmu_norm")
    y = net.norm(net.dense(x, f"{ffn}/fc1"), f"{ffn}/norm1")
    y = net.norm(net.dense(jax.nn.gelu(y, approximate=False), f"{ffn}/fc2"), f"{ffn}/norm2")
    return x + jax.nn.relu(y), memory
