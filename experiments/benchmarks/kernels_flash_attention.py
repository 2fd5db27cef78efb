"""Benchmark of the Pallas flash-attention kernel (structured and soft-causal masks).

Markdown tables:

  1. correctness: ``dot_product_attention(implementation="pallas")`` in float32
     against the float64 ``"reference"`` at small sizes (GQA, lengths that are
     not multiples of the blocks, causal / window / packed segments with padding
     / soft-causal), forward and the gradients w.r.t. q, k, v: the largest
     absolute difference divided by the reference's largest magnitude. In
     interpret mode on CPU, compiled on a GPU.
  2. speed (GPU): per sequence length (1024, 4096), head dim (64, 128) and mask
     (causal, soft-causal r = 0.5), bfloat16, batch 2, 16 heads: forward and
     forward + backward time of the kernel, of the op's ``"xla"`` path, and of
     cuDNN's causal attention (``jax.nn.dot_product_attention(implementation=
     "cudnn", is_causal=True)``, the issue's yardstick, also on the soft rows)
     and cuDNN's unmasked attention (``is_causal=False``: the same work as
     soft-causal with 0 < r < 1, which sees every key),
     each with achieved TFLOP/s and its fraction of the measured bfloat16 matmul
     peak, and the kernel's time over each cuDNN's. FLOPs are counted, not taken from
     XLA (which cannot see into a kernel): ``4 B H L^2 D`` forward (two matmuls),
     halved for causal (the visible triangle; soft-causal sees every key), and
     2.5 times that for the backward (five matmuls). On CPU the table is printed
     with "not measured" cells: interpret mode says nothing about GPU speed.
  3. with ``--sweep`` (GPU): the kernel's block sizes and Triton warps / stages
     at L 4096, to tune the defaults; ``--sweep-launch``: the warps / stages
     alone, around the default blocks.
  4. with ``--ablate-schedules`` (GPU): at L 4096, the kernel as it is against
     the same kernel with every block pair walked with the element mask
     (``flash_attention.block_schedules``' unmasked runs emptied), causal and
     soft-causal, forward and forward + backward: what skipping the element
     mask on all-visible blocks is worth.

Run:
  .venv/bin/python experiments/benchmarks/kernels_flash_attention.py          # CPU or GPU
  python experiments/benchmarks/kernels_flash_attention.py --sweep             # GPU, tuning
  python experiments/benchmarks/kernels_flash_attention.py --skip-correctness --skip-speed \
      --sweep-launch --ablate-schedules                                        # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effformer.kernels import flash_attention as flash_kernel
from effformer.kernels.flash_attention import BlockSizes
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

NOT_MEASURED = "not measured"


def _inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], (batch, q_len, heads, head_dim), dtype)
    return q, k, v, d_out


def _value_and_grads(attend):
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    return jax.jit(run)


# ----------------------------------------------------------------------------- correctness


def _segments(length: int) -> np.ndarray:
    """Row 0: two packed sequences and 5 padding tokens; row 1: one sequence."""
    first = length // 3
    row0 = [1] * first + [2] * (length - first - 5) + [0] * 5
    return np.array([row0, [1] * length], np.int32)


def correctness_table(interpret: bool) -> None:
    length, short = 100, 37
    blocks = BlockSizes(16, 16, 16, 16) if interpret else None
    segments = jnp.asarray(_segments(length))
    cases = [
        ("causal", length, AttentionMask(causal=True)),
        ("causal, Lq 37 against Lk 100", short, AttentionMask(causal=True)),
        ("window (16 left, 0 right)", length, AttentionMask(window_left=16, window_right=0)),
        (
            "causal packed segments + padding",
            length,
            AttentionMask(causal=True, q_segment_ids=segments, kv_segment_ids=segments),
        ),
        ("soft-causal r = 0", length, AttentionMask(soft_causal_ratio=0.0)),
        ("soft-causal r = 0.3", length, AttentionMask(soft_causal_ratio=0.3)),
        ("soft-causal r = 1", length, AttentionMask(soft_causal_ratio=1.0)),
    ]
    mode = "interpret mode" if interpret else "compiled"
    print(
        f"Correctness ({mode}; float32 kernel vs float64 reference; batch 2, 4 query heads on "
        "2 kv heads, head dim 32, Lk 100; blocks "
        f"{'16' if interpret else 'default'}): max |pallas - reference| / max |reference|\n"
    )
    print("| case | out | dq | dk | dv |")
    print("| --- | --- | --- | --- | --- |")
    for name, q_len, mask in cases:
        q, k, v, d_out = _inputs(2, q_len, length, 4, 2, 32, jnp.float32)
        kernel = _value_and_grads(
            lambda q, k, v, mask=mask: dot_product_attention(
                q, k, v, mask=mask, implementation="pallas", pallas_block_sizes=blocks
            )
        )
        got = jax.tree.leaves(kernel(q, k, v, d_out))
        with jax.enable_x64(True):
            as64 = [x.astype(jnp.float64) for x in (q, k, v, d_out)]
            reference = _value_and_grads(
                lambda q, k, v, mask=mask: dot_product_attention(
                    q, k, v, mask=mask, implementation="reference"
                )
            )
            expected = [np.asarray(x) for x in jax.tree.leaves(reference(*as64))]
        errors = [
            float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
            for a, b in zip(got, expected, strict=True)
        ]
        print(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
    print()


# ----------------------------------------------------------------------------- speed


def _median_seconds(fn, args, repeats: int) -> float:
    return median_seconds(fn, *args, repeats=repeats)


def matmul_peak_tflops(size: int = 8192, repeats: int = 10) -> float:
    """Measured bfloat16 matmul throughput on random data, the denominator of 'fraction'."""
    keys = jax.random.split(jax.random.key(1))
    a, b = (jax.random.normal(key, (size, size), jnp.bfloat16) for key in keys)
    seconds = median_seconds(jax.jit(lambda a, b: a @ b), a, b, repeats=repeats)
    return 2 * size**3 / seconds / 1e12


def _programs(mask: AttentionMask, blocks: BlockSizes | None):
    """name -> (forward, forward + backward) jitted programs of (q, k, v, d_out)."""

    def op(implementation):
        def attend(q, k, v):
            return dot_product_attention(
                q, k, v, mask=mask, implementation=implementation, pallas_block_sizes=blocks
            )

        return attend

    def cudnn_causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def cudnn_full(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=False, implementation="cudnn")

    programs = {}
    for name, attend in (
        ("pallas", op("pallas")),
        ("xla", op("xla")),
        ("cudnn", cudnn_causal),
        ("cudnn full", cudnn_full),
    ):
        forward = jax.jit(lambda q, k, v, d_out, attend=attend: attend(q, k, v))
        programs[name] = (forward, _value_and_grads(attend))
    return programs


def _flops(batch, heads, length, head_dim, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def speed_table(on_gpu: bool, repeats: int) -> None:
    batch, heads = 2, 16
    peak = matmul_peak_tflops() if on_gpu else None
    device = jax.devices()[0].device_kind
    print(
        f"Speed ({device}; bfloat16, batch {batch}, {heads} heads; median of {repeats} runs; "
        "TFLOP/s counted as in the docstring; fraction of the measured bf16 matmul peak"
        + (f" {peak:.0f} TFLOP/s" if peak else "")
        + "; cudnn = cuDNN causal attention)\n"
    )
    columns = ("pallas", "xla", "cudnn", "cudnn full")
    print(
        "| L | head dim | mask | pass | "
        + " | ".join(f"{c} ms | {c} TFLOP/s (fraction)" for c in columns)
        + " | pallas / cudnn | pallas / cudnn full |"
    )
    print("| " + " | ".join(["---"] * (6 + 2 * len(columns))) + " |")
    for length, head_dim, soft in itertools.product((1024, 4096), (64, 128), (False, True)):
        mask = AttentionMask(soft_causal_ratio=0.5) if soft else AttentionMask(causal=True)
        mask_name = "soft-causal r 0.5" if soft else "causal"
        programs = _programs(mask, None) if on_gpu else {}
        args = (
            _inputs(batch, length, length, heads, heads, head_dim, jnp.bfloat16) if on_gpu else ()
        )
        for backward, pass_name in ((False, "forward"), (True, "forward + backward")):
            cells, seconds = [], {}
            for name in columns:
                if not on_gpu:
                    cells += [NOT_MEASURED, NOT_MEASURED]
                    continue
                try:
                    seconds[name] = _median_seconds(programs[name][int(backward)], args, repeats)
                except Exception as error:  # e.g. XLA's materialised scores out of memory
                    cells += [f"failed: {type(error).__name__}", ""]
                    continue
                # Work each computes: "cudnn" is causal and "cudnn full" unmasked on every
                # row; pallas / xla follow the mask.
                causal = name == "cudnn" or (name != "cudnn full" and not soft)
                flops = _flops(batch, heads, length, head_dim, causal, backward)
                tflops = flops / seconds[name] / 1e12
                cells += [f"{seconds[name] * 1e3:.3f}", f"{tflops:.0f} ({tflops / peak:.0%})"]
            ratios = [
                f"{seconds['pallas'] / seconds[name]:.2f}x"
                if "pallas" in seconds and name in seconds
                else NOT_MEASURED
                for name in ("cudnn", "cudnn full")
            ]
            row = [str(length), str(head_dim), mask_name, pass_name, *cells, *ratios]
            print("| " + " | ".join(row) + " |", flush=True)
    print()


def sweep_table(repeats: int, launch_only: bool = False) -> None:
    batch, heads, length = 2, 16, 4096
    print(
        f"Block sweep (bfloat16, batch {batch}, {heads} heads, L {length}, soft-causal r 0.5; "
        "forward blocks timed on the forward, backward blocks on forward + backward)\n"
    )
    print(
        "| head dim | block_q | block_k | block_q_bwd | block_k_bwd | warps | stages "
        "| forward ms | fwd+bwd ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    mask = AttentionMask(soft_causal_ratio=0.5)
    for head_dim in (64, 128):
        args = _inputs(batch, length, length, heads, heads, head_dim, jnp.bfloat16)
        candidates = []
        if not launch_only:
            # The forward and the backward kernels do not share blocks: each set is swept
            # with the other at its default (the forward's time does not depend on the
            # backward blocks), the default once.
            default = BlockSizes()
            forward_blocks = ((64, 64), (128, 32), (128, 64), (128, 128))
            backward_blocks = ((32, 64), (64, 64), (64, 128), (128, 64), (128, 128))
            candidates += [BlockSizes(bq, bk) for bq, bk in forward_blocks]
            candidates += [
                BlockSizes(block_q_bwd=bqb, block_k_bwd=bkb)
                for bqb, bkb in backward_blocks
                if (bqb, bkb) != (default.block_q_bwd, default.block_k_bwd)
            ]
        # Triton's launch parameters around the default blocks.
        candidates += [
            BlockSizes(num_warps=warps, num_stages=stages)
            for warps, stages in itertools.product((4, 8), (1, 2, 3))
        ]
        for blocks in candidates:
            forward, both = _programs(mask, blocks)["pallas"]
            try:
                cells = [
                    f"{_median_seconds(forward, args, repeats) * 1e3:.3f}",
                    f"{_median_seconds(both, args, repeats) * 1e3:.3f}",
                ]
            except Exception as error:  # e.g. Triton out of shared memory for large blocks
                cells = [f"failed: {type(error).__name__}", ""]
            sizes = (blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
            warps = blocks.num_warps or f"{4 if head_dim <= 64 else 8} (default)"
            row = [str(head_dim), *map(str, sizes), str(warps), str(blocks.num_stages), *cells]
            print("| " + " | ".join(row) + " |", flush=True)
    print()


@contextlib.contextmanager
def _element_mask_everywhere():
    """Traces the kernel with no unmasked runs: every block pair gets the element mask."""
    uniform_pairs = flash_kernel._uniform_pairs

    def no_runs(*args):
        weight_one, weight_ratio = uniform_pairs(*args)
        return jnp.zeros_like(weight_one), jnp.zeros_like(weight_ratio)

    flash_kernel._uniform_pairs = no_runs
    try:
        yield
    finally:
        flash_kernel._uniform_pairs = uniform_pairs


def schedule_ablation_table(repeats: int) -> None:
    batch, heads, length = 2, 16, 4096
    print(
        f"Unmasked runs (bfloat16, batch {batch}, {heads} heads, L {length}, default blocks): "
        "the kernel against the same kernel with the element mask on every block\n"
    )
    print("| head dim | mask | pass | runs ms | mask everywhere ms | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for head_dim, soft in itertools.product((64, 128), (False, True)):
        mask = AttentionMask(soft_causal_ratio=0.5) if soft else AttentionMask(causal=True)
        args = _inputs(batch, length, length, heads, heads, head_dim, jnp.bfloat16)
        # jit traces lazily: lower each program where the patch should (not) be seen.
        with_runs = [fn.lower(*args) for fn in _programs(mask, None)["pallas"]]
        with _element_mask_everywhere():
            masked = [fn.lower(*args) for fn in _programs(mask, None)["pallas"]]
        if any(a.as_text() == b.as_text() for a, b in zip(with_runs, masked, strict=True)):
            raise RuntimeError("the element-mask-everywhere programs equal the kernel's")
        with_runs = [lowered.compile() for lowered in with_runs]
        masked = [lowered.compile() for lowered in masked]
        for index, pass_name in enumerate(("forward", "forward + backward")):
            runs = _median_seconds(with_runs[index], args, repeats)
            everywhere = _median_seconds(masked[index], args, repeats)
            name = "soft-causal r 0.5" if soft else "causal"
            print(
                f"| {head_dim} | {name} | {pass_name} | {runs * 1e3:.3f} | "
                f"{everywhere * 1e3:.3f} | {everywhere / runs:.2f}x |",
                flush=True,
            )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="block sizes (GPU)")
    parser.add_argument("--sweep-launch", action="store_true", help="warps / stages (GPU)")
    parser.add_argument(
        "--ablate-schedules", action="store_true", help="element mask everywhere (GPU)"
    )
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})\n")
    if not args.skip_correctness:
        correctness_table(interpret=not on_gpu)
    if not args.skip_speed:
        speed_table(on_gpu, args.repeats)
    if (args.sweep or args.sweep_launch or args.ablate_schedules) and not on_gpu:
        raise SystemExit("--sweep, --sweep-launch and --ablate-schedules need a GPU")
    if args.sweep or args.sweep_launch:
        sweep_table(args.repeats, launch_only=not args.sweep)
    if args.ablate_schedules:
        schedule_ablation_table(args.repeats)


if __name__ == "__main__":
    main()
