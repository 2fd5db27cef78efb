"""The split-K decode-attention kernel's parts: stream-K schedule, partial combination, lowering.

The kernel's numerics (interpret mode) are tested through its op in
tests/ops/test_decode_attention.py; here are the pieces that op-level tests
cannot isolate, each against a plain loop.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from effformer.kernels import decode_attention as kernel


def _simulated_schedule(lengths, kv_heads, block_k, num_programs):
    """Plain loop: the (program, head) -> tiles map of the stream-K assignment."""
    heads = [
        (b * kv_heads + h, -(-length // block_k))
        for b, length in enumerate(lengths)
        for h in range(kv_heads)
    ]
    line = [head for head, tiles in heads for _ in range(tiles)]  # the head of each tile
    per_program = max(1, -(-len(line) // num_programs))
    assignment = {}  # (program, head) -> number of tiles
    for tile, head in enumerate(line):
        key = (tile // per_program, head)
        assignment[key] = assignment.get(key, 0) + 1
    return line, per_program, assignment


# One compiled schedule per program count; the lengths (6 sequences, 2 kv heads, 16-key
# tiles) are traced.
KV_HEADS, BLOCK_K = 2, 16
_schedule = jax.jit(kernel.make_schedule, static_argnums=(1, 2, 3))


@pytest.mark.parametrize(
    "lengths, num_programs",
    [
        ((0, 1, 40, 23, 0, 0), 8),  # ranges cross head boundaries, heads span programs
        ((100, 3, 0, 0, 64, 17), 8),  # empty heads inside a program's range
        ((0, 0, 0, 0, 0, 0), 8),  # no work
        ((1000, 0, 0, 0, 0, 0), 8),  # one sequence spread over every program
        ((0, 1, 40, 23, 5, 9), 5),  # uneven cut: the last program is shorter
        ((7, 7, 7, 7, 7, 7), 64),  # far more programs than tiles
    ],
)
def test_schedule_matches_a_plain_loop(lengths, num_programs):
    kv_heads, block_k = KV_HEADS, BLOCK_K
    schedule = _schedule(jnp.asarray(lengths, jnp.int32), kv_heads, block_k, num_programs)
    line, per_program, assignment = _simulated_schedule(lengths, kv_heads, block_k, num_programs)
    num_heads_total = len(lengths) * kv_heads
    tile_start = np.asarray(schedule.tile_start)
    programs = np.asarray(schedule.programs)
    slot_head = np.asarray(schedule.slot_head)
    assert tile_start[-1] == len(line)

    # Each program's range is its equal share of the tile line; the heads it visits
    # are those its tiles belong to (plus, harmlessly, empty heads between them).
    written = {}
    for program, (first, end, first_head, last_head) in enumerate(programs):
        assert first == min(program * per_program, len(line))
        assert end == min(first + per_program, len(line))
        for head in range(first_head, last_head + 1):
            lo = max(first, tile_start[head])
            hi = min(end, tile_start[head + 1])
            if hi > lo:
                assert assignment[(program, head)] == hi - lo
            assert program + head not in written  # every partial has its own slot
            written[program + head] = head
    assert sum(assignment.values()) == len(line)
    assert all(key[1] in range(programs[key[0], 2], programs[key[0], 3] + 1) for key in assignment)

    # slot_head names exactly the written slots and their heads.
    expected = np.full(num_programs + num_heads_total, num_heads_total)
    for slot, head in written.items():
        expected[slot] = head
    np.testing.assert_array_equal(slot_head, expected)


def test_combine_partials_is_the_softmax_of_the_union():
    """Partials of arbitrary key ranges, in arbitrary slots, some unwritten (NaN), recombine
    to the softmax over all keys; a head with no keys gives zeros."""
    rng = np.random.default_rng(0)
    num_heads_total, rows, head_dim, keys = 3, 2, 4, 10
    scores = rng.standard_normal((num_heads_total, rows, keys)) * 3
    values = rng.standard_normal((num_heads_total, keys, head_dim))
    # slot -> (head, key range); head 2 has no keys; slots 1 and 5 are unwritten.
    pieces = {0: (0, 0, 3), 2: (0, 3, 10), 3: (1, 0, 1), 4: (1, 1, 6), 6: (1, 6, 10)}
    num_slots = 7
    o = np.full((num_slots, rows, head_dim), np.nan, np.float32)
    m = np.full((num_slots, rows), np.nan, np.float32)
    norm = np.full((num_slots, rows), np.nan, np.float32)
    slot_head = np.full(num_slots, num_heads_total, np.int32)
    for slot, (head, lo, hi) in pieces.items():
        s = scores[head, :, lo:hi]
        m[slot] = s.max(axis=1)
        p = np.exp(s - m[slot][:, None])
        norm[slot] = p.sum(axis=1)
        o[slot] = p @ values[head, lo:hi]
        slot_head[slot] = head
    combine = jax.jit(kernel.combine_partials, static_argnums=4)
    out = np.asarray(combine(o, m, norm, slot_head, num_heads_total))
    probs = np.exp(scores - scores.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(out[:2], (probs @ values)[:2], rtol=1e-5, atol=1e-6)
    assert np.all(out[2] == 0.0)


def test_lowers_to_triton_for_cuda():
    """Pallas' Triton lowering accepts the kernel (block shapes, loops, dots, dynamic
    indexing) for a bf16 GQA cache; no GPU is needed to lower, only to compile and run."""
    call = jax.jit(
        functools.partial(kernel.split_k_decode_attention, scale=0.125, num_programs=12, block_k=64)
    )
    batch, max_len, heads, kv_heads, head_dim = 2, 200, 8, 2, 64
    arguments = (
        jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch, max_len, kv_heads, head_dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch, max_len, kv_heads, head_dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    triton_call = "__gpu$xla.gpu.triton"
    exported = export.export(
        call,
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(triton_call)],
    )(*arguments)
    assert triton_call in exported.mlir_module()
