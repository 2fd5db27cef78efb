"""Benchmark of the Pallas flash-attention kernel (structured and soft-causal masks).

Markdown tables:

  1. correctness: ``dot_product_attention(implementation="pallas")`` in float32
     against the float64 ``"reference"`` (run on the host CPU) at small sizes
     (GQA, lengths that are not multiples of the blocks, causal / window /
     packed segments with padding / soft-causal), forward and the gradients
     w.r.t. q, k, v: the largest absolute difference divided by the
     reference's largest magnitude. In interpret mode on CPU, compiled on a GPU
     (the Triton kernel) or a TPU (the Mosaic kernel).
  2. speed (GPU or TPU): per sequence length (1024, 4096), head dim (64, 128)
     and mask (causal, soft-causal r = 0.5), bfloat16, batch 2, 16 heads:
     forward and forward + backward time of the kernel, of the op's ``"xla"``
     path, and of the platform library's causal attention (the issue's
     yardstick, also on the soft rows) and unmasked attention (the same work as
     soft-causal with 0 < r < 1, which sees every key): cuDNN through
     ``jax.nn.dot_product_attention(implementation="cudnn")`` on a GPU, splash
     attention on a TPU (``kernel_baselines.py``). Each with achieved TFLOP/s
     and its fraction of the measured bfloat16 matmul peak, and the kernel's
     time over each library time. FLOPs are counted, not taken from XLA (which
     cannot see into a kernel): ``4 B H L^2 D`` forward (two matmuls), halved
     for causal (the visible triangle; soft-causal sees every key), and 2.5
     times that for the backward (five matmuls). On CPU the table is printed
     with "not measured" cells: interpret mode says nothing about speed.
  3. with ``--sweep`` (GPU or TPU): the kernel's block sizes at L 4096, to tune
     the defaults (on a GPU also Triton's warps / stages); ``--sweep-launch``
     (GPU): the warps / stages alone, around the default blocks.
  4. with ``--ablate-schedules`` (GPU): at L 4096, the kernel as it is against
     the same kernel with every block pair walked with the element mask
     (``flash_attention.block_schedules``' unmasked runs emptied), causal and
     soft-causal, forward and forward + backward: what skipping the element
     mask on all-visible blocks is worth.
  5. with ``--ablate-backward`` (GPU): at L 4096, forward + backward with the
     two backward kernels (the default) against the fused backward
     (``BlockSizes(fused_backward=True)``: dq added by the dk/dv kernel with
     atomic adds, five block matmuls per pair instead of seven), default blocks
     otherwise, causal and soft-causal.
  6. with ``--mosaic-forward`` (GPU): at L 4096, the Mosaic GPU forward
     (``BlockSizes(mosaic_forward=True)``, :mod:`effformer.kernels.flash_attention_mosaic_gpu`)
     at four block shapes against the Triton forward and cuDNN's causal and
     unmasked attention, with its largest difference from the Triton output, and
     forward + backward with the Triton backward and with the Mosaic GPU backward
     (``BlockSizes(mosaic_backward=True)``).

Run:
  .venv/bin/python experiments/benchmarks/kernels_flash_attention.py    # CPU, GPU or TPU
  python experiments/benchmarks/kernels_flash_attention.py --sweep       # GPU or TPU, tuning
  python experiments/benchmarks/kernels_flash_attention.py --skip-correctness --skip-speed \
      --sweep-launch --ablate-schedules --ablate-backward --mosaic-forward  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effformer.kernels import flash_attention as flash_kernel
from effformer.kernels import flash_attention_tpu
from effformer.kernels.flash_attention import BlockSizes, default_block_sizes
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

sys.path.insert(0, str(Path(__file__).parent))
from kernel_baselines import (  # noqa: E402
    LIBRARY_NAMES,
    accelerator,
    failure,
    library_attention,
    reference_device,
)
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
    # Small blocks so that the 100 keys span several (the TPU kernel's are >= 128).
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
        f"{'16' if interpret else 'default'}; {jax.devices()[0].device_kind}): "
        "max |pallas - reference| / max |reference|\n"
    )
    print("| case | out | dq | dk | dv |")
    print("| --- | --- | --- | --- | --- |")
    for name, q_len, mask in cases:
        try:
            errors = _correctness_errors(q_len, length, mask, blocks)
        except Exception as error:  # e.g. a compiler rejecting a case: say so, go on
            print(f"| {name} | {failure(error)} | | | |", flush=True)
            continue
        print(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
    print()


def _correctness_errors(q_len, length, mask, blocks) -> list[float]:
    """Relative errors of the kernel's out, dq, dk, dv against the float64 reference."""
    q, k, v, d_out = _inputs(2, q_len, length, 4, 2, 32, jnp.float32)
    kernel = _value_and_grads(
        lambda q, k, v: dot_product_attention(
            q, k, v, mask=mask, implementation="pallas", pallas_block_sizes=blocks
        )
    )
    got = jax.tree.leaves(kernel(q, k, v, d_out))
    with reference_device():
        as64 = [np.asarray(x, np.float64) for x in (q, k, v, d_out)]
        reference = _value_and_grads(
            lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="reference")
        )
        expected = [np.asarray(x) for x in jax.tree.leaves(reference(*as64))]
    return [
        float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
        for a, b in zip(got, expected, strict=True)
    ]


# ----------------------------------------------------------------------------- speed


def _median_seconds(fn, args, repeats: int) -> float:
    return median_seconds(fn, *args, repeats=repeats)


def matmul_peak_tflops(size: int = 8192, repeats: int = 10) -> float:
    """Measured bfloat16 matmul throughput on random data, the denominator of 'fraction'."""
    keys = jax.random.split(jax.random.key(1))
    a, b = (jax.random.normal(key, (size, size), jnp.bfloat16) for key in keys)
    seconds = median_seconds(jax.jit(lambda a, b: a @ b), a, b, repeats=repeats)
    return 2 * size**3 / seconds / 1e12


def _op(mask: AttentionMask, implementation: str, blocks=None):
    """The op's attention with ``mask``; ``blocks``: the backend kernel's ``BlockSizes``."""

    def attend(q, k, v):
        return dot_product_attention(
            q, k, v, mask=mask, implementation=implementation, pallas_block_sizes=blocks
        )

    return attend


def _jitted(attend):
    """(forward, forward + backward) jitted programs of (q, k, v, d_out)."""
    forward = jax.jit(lambda q, k, v, d_out: attend(q, k, v))
    return forward, _value_and_grads(attend)


def _programs(mask: AttentionMask, backend: str, length: int, heads: int):
    """name -> (forward, forward + backward) programs at the default blocks.

    Names: "pallas", "xla", the library's causal attention ("cudnn" / "splash")
    and its unmasked attention ("cudnn full" / "splash full").
    """
    library = LIBRARY_NAMES[backend]
    return {
        "pallas": _jitted(_op(mask, "pallas")),
        "xla": _jitted(_op(mask, "xla")),
        library: _jitted(library_attention(backend, True, length, heads)),
        f"{library} full": _jitted(library_attention(backend, False, length, heads)),
    }


def _flops(batch, heads, length, head_dim, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def speed_table(backend: str | None, repeats: int) -> None:
    """``backend``: "gpu" or "tpu" to time, None (CPU) for a table of "not measured"."""
    batch, heads = 2, 16
    peak = matmul_peak_tflops() if backend else None
    device = jax.devices()[0].device_kind
    library = LIBRARY_NAMES.get(backend, "cudnn")
    described = {"cudnn": "cuDNN", "splash": "splash attention"}[library]
    print(
        f"Speed ({device}; bfloat16, batch {batch}, {heads} heads; median of {repeats} runs; "
        "TFLOP/s counted as in the docstring; fraction of the measured bf16 matmul peak"
        + (f" {peak:.0f} TFLOP/s" if peak else "")
        + f"; {library} = {described}'s causal attention, {library} full = its unmasked)\n"
    )
    columns = ("pallas", "xla", library, f"{library} full")
    print(
        "| L | head dim | mask | pass | "
        + " | ".join(f"{c} ms | {c} TFLOP/s (fraction)" for c in columns)
        + f" | pallas / {library} | pallas / {library} full |"
    )
    print("| " + " | ".join(["---"] * (6 + 2 * len(columns))) + " |")
    for length, head_dim, soft in itertools.product((1024, 4096), (64, 128), (False, True)):
        mask = AttentionMask(soft_causal_ratio=0.5) if soft else AttentionMask(causal=True)
        mask_name = "soft-causal r 0.5" if soft else "causal"
        programs = _programs(mask, backend, length, heads) if backend else {}
        args = (
            _inputs(batch, length, length, heads, heads, head_dim, jnp.bfloat16) if backend else ()
        )
        for backward, pass_name in ((False, "forward"), (True, "forward + backward")):
            cells, seconds = [], {}
            for name in columns:
                if not backend:
                    cells += [NOT_MEASURED, NOT_MEASURED]
                    continue
                try:
                    seconds[name] = _median_seconds(programs[name][int(backward)], args, repeats)
                except Exception as error:  # e.g. XLA's materialised scores out of memory
                    cells += [f"failed: {type(error).__name__}", ""]
                    continue
                # Work each computes: the library's causal attention is causal and its
                # "full" unmasked on every row; pallas / xla follow the mask.
                causal = name == library or (name != f"{library} full" and not soft)
                flops = _flops(batch, heads, length, head_dim, causal, backward)
                tflops = flops / seconds[name] / 1e12
                cells += [f"{seconds[name] * 1e3:.3f}", f"{tflops:.0f} ({tflops / peak:.0%})"]
            ratios = [
                f"{seconds['pallas'] / seconds[name]:.2f}x"
                if "pallas" in seconds and name in seconds
                else NOT_MEASURED
                for name in (library, f"{library} full")
            ]
            row = [str(length), str(head_dim), mask_name, pass_name, *cells, *ratios]
            print("| " + " | ".join(row) + " |", flush=True)
    print()


def _gpu_candidates(launch_only: bool) -> list[BlockSizes]:
    """Triton kernel settings to time: block sizes, then warps / stages at the default blocks."""
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
    candidates += [
        BlockSizes(num_warps=warps, num_stages=stages)
        for warps, stages in itertools.product((4, 8), (1, 2, 3))
    ]
    return candidates


def _tpu_candidates() -> list[flash_attention_tpu.BlockSizes]:
    """Mosaic kernel block sizes to time (multiples of 128): the default, then the forward
    and the backward blocks apart (each with the other at its default)."""
    default = flash_attention_tpu.BlockSizes()
    sizes = ((128, 256), (256, 128), (256, 256), (256, 512), (512, 256), (512, 512))
    return [
        default,
        *(flash_attention_tpu.BlockSizes(block_q=bq, block_k=bk) for bq, bk in sizes),
        *(flash_attention_tpu.BlockSizes(block_q_bwd=bq, block_k_bwd=bk) for bq, bk in sizes),
    ]


def sweep_table(backend: str, repeats: int, launch_only: bool = False) -> None:
    """The kernel's block sizes (and on a GPU Triton's warps / stages) at L 4096."""
    batch, heads, length = 2, 16, 4096
    print(
        f"Block sweep ({jax.devices()[0].device_kind}; bfloat16, batch {batch}, {heads} heads, "
        f"L {length}, soft-causal r 0.5; forward blocks timed on the forward, backward blocks "
        "on forward + backward)\n"
    )
    launch = ["warps", "stages"] if backend == "gpu" else []
    header = ["head dim", "block_q", "block_k", "block_q_bwd", "block_k_bwd", *launch]
    header += ["forward ms", "fwd+bwd ms"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] * len(header)) + " |")
    mask = AttentionMask(soft_causal_ratio=0.5)
    for head_dim in (64, 128):
        args = _inputs(batch, length, length, heads, heads, head_dim, jnp.bfloat16)
        candidates = _gpu_candidates(launch_only) if backend == "gpu" else _tpu_candidates()
        for blocks in candidates:
            forward, both = _jitted(_op(mask, "pallas", blocks))
            try:
                cells = [
                    f"{_median_seconds(forward, args, repeats) * 1e3:.3f}",
                    f"{_median_seconds(both, args, repeats) * 1e3:.3f}",
                ]
            except Exception as error:  # e.g. out of shared memory / VMEM for large blocks
                cells = [f"failed: {type(error).__name__}", ""]
            sizes = (blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
            row = [str(head_dim), *map(str, sizes)]
            if backend == "gpu":
                warps = blocks.num_warps or f"{4 if head_dim <= 64 else 8} (default)"
                row += [str(warps), str(blocks.num_stages)]
            print("| " + " | ".join(row + cells) + " |", flush=True)
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
        with_runs = [fn.lower(*args) for fn in _jitted(_op(mask, "pallas"))]
        with _element_mask_everywhere():
            masked = [fn.lower(*args) for fn in _jitted(_op(mask, "pallas"))]
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


def backward_ablation_table(repeats: int, batch=2, heads=16, length=4096) -> None:
    print(
        f"Fused backward (bfloat16, batch {batch}, {heads} heads, L {length}, default blocks): "
        "forward + backward with the dq kernel against dq by atomic adds in the dk/dv kernel\n"
    )
    print("| head dim | mask | two kernels ms | fused ms | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for head_dim, soft in itertools.product((64, 128), (False, True)):
        mask = AttentionMask(soft_causal_ratio=0.5) if soft else AttentionMask(causal=True)
        args = _inputs(batch, length, length, heads, heads, head_dim, jnp.bfloat16)
        two_kernels = default_block_sizes(jnp.bfloat16, head_dim)
        fused = dataclasses.replace(two_kernels, fused_backward=True)
        seconds = []
        for blocks in (two_kernels, fused):
            both = _jitted(_op(mask, "pallas", blocks))[1]
            try:
                seconds.append(_median_seconds(both, args, repeats))
            except Exception as error:  # e.g. a lowering this Triton rejects: report it
                seconds.append(None)
                print(f"<!-- fused_backward={blocks.fused_backward}: {error!r} -->")
        cells = [f"{t * 1e3:.3f}" if t else "failed" for t in seconds]
        speedup = f"{seconds[0] / seconds[1]:.2f}x" if all(seconds) else ""
        name = "soft-causal r 0.5" if soft else "causal"
        print(f"| {head_dim} | {name} | " + " | ".join(cells) + f" | {speedup} |", flush=True)
    print()


MOSAIC_BLOCKS = ((64, 64), (64, 128), (128, 64), (128, 128))


def mosaic_forward_table(repeats: int, batch=2, heads=16, length=4096) -> None:
    """The Mosaic GPU forward against the Triton forward and cuDNN, at L 4096."""
    print(
        f"Mosaic GPU forward (bfloat16, batch {batch}, {heads} heads, L {length}): "
        "BlockSizes(mosaic_forward=True) with the forward blocks given (backward: the "
        "default Triton kernels) against the Triton forward at the default blocks and "
        "cuDNN; 'error' = largest |mosaic - triton| of the forward outputs over the "
        "largest |triton|; the last column also runs the backward on Mosaic GPU "
        "(BlockSizes(mosaic_backward=True), default backward blocks)\n"
    )
    print(
        "| head dim | mask | block_q x block_k | error | triton fwd ms | mosaic fwd ms | "
        "triton / mosaic | mosaic / cudnn | mosaic / cudnn full | triton fwd+bwd ms | "
        "mosaic fwd + triton bwd ms | mosaic fwd + mosaic bwd ms |"
    )
    print("| " + " | ".join(["---"] * 12) + " |")
    for head_dim, soft in itertools.product((64, 128), (False, True)):
        mask = AttentionMask(soft_causal_ratio=0.5) if soft else AttentionMask(causal=True)
        name = "soft-causal r 0.5" if soft else "causal"
        args = _inputs(batch, length, length, heads, heads, head_dim, jnp.bfloat16)
        triton = _jitted(_op(mask, "pallas"))
        library = {
            full: _jitted(library_attention("gpu", not full, length, heads))[0]
            for full in (False, True)
        }
        base = {
            "fwd": _median_seconds(triton[0], args, repeats),
            "both": _median_seconds(triton[1], args, repeats),
            "cudnn": _median_seconds(library[False], args, repeats),
            "cudnn full": _median_seconds(library[True], args, repeats),
        }
        expected = np.asarray(triton[0](*args), np.float32)
        for block_q, block_k in MOSAIC_BLOCKS:
            blocks = dataclasses.replace(
                default_block_sizes(jnp.bfloat16, head_dim),
                block_q=block_q,
                block_k=block_k,
                mosaic_forward=True,
            )
            mosaic = _jitted(_op(mask, "pallas", blocks))
            all_mosaic = _jitted(
                _op(mask, "pallas", dataclasses.replace(blocks, mosaic_backward=True))
            )[1]
            try:
                got = np.asarray(mosaic[0](*args), np.float32)
                error = np.abs(got - expected).max() / np.abs(expected).max()
                forward = _median_seconds(mosaic[0], args, repeats)
                both = _median_seconds(mosaic[1], args, repeats)
            except Exception as exc:  # a kernel Mosaic GPU or ptxas rejects: report it
                cells = [failure(exc)] + [""] * 8
            else:
                try:
                    mosaic_backward = f"{_median_seconds(all_mosaic, args, repeats) * 1e3:.3f}"
                except Exception as exc:
                    mosaic_backward = failure(exc)
                cells = [
                    f"{error:.1e}",
                    f"{base['fwd'] * 1e3:.3f}",
                    f"{forward * 1e3:.3f}",
                    f"{base['fwd'] / forward:.2f}x",
                    f"{forward / base['cudnn']:.2f}x",
                    f"{forward / base['cudnn full']:.2f}x",
                    f"{base['both'] * 1e3:.3f}",
                    f"{both * 1e3:.3f}",
                    mosaic_backward,
                ]
            row = [str(head_dim), name, f"{block_q} x {block_k}", *cells]
            print("| " + " | ".join(row) + " |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="block sizes (GPU or TPU)")
    parser.add_argument("--sweep-launch", action="store_true", help="warps / stages (GPU)")
    parser.add_argument(
        "--ablate-schedules", action="store_true", help="element mask everywhere (GPU)"
    )
    parser.add_argument(
        "--ablate-backward", action="store_true", help="fused against two-kernel backward (GPU)"
    )
    parser.add_argument(
        "--mosaic-forward", action="store_true", help="Mosaic GPU against Triton forward (GPU)"
    )
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    backend = accelerator()
    # Checked before anything runs: a flag this device cannot serve is an error, not a no-op.
    if args.sweep and not backend:
        parser.error("--sweep times the kernel: it needs a GPU or a TPU.")
    gpu_only = args.sweep_launch or args.ablate_schedules or args.ablate_backward
    if (gpu_only or args.mosaic_forward) and backend != "gpu":
        parser.error(
            "--sweep-launch, --ablate-schedules, --ablate-backward and --mosaic-forward time "
            "the GPU kernels: they need a GPU."
        )
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})\n")
    if not args.skip_correctness:
        correctness_table(interpret=not backend)
    if not args.skip_speed:
        speed_table(backend, args.repeats)
    if args.sweep or args.sweep_launch:
        sweep_table(backend, args.repeats, launch_only=not args.sweep)
    if args.ablate_schedules:
        schedule_ablation_table(args.repeats)
    if args.ablate_backward:
        backward_ablation_table(args.repeats)
    if args.mosaic_forward:
        mosaic_forward_table(args.repeats)


if __name__ == "__main__":
    main()
