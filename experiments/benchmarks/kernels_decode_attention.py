"""Split-K decode attention: the Pallas kernel vs the XLA split-K path vs the dense reference.

One query per sequence against a KV cache of ``cache`` slots, head_dim 128.
For each size: median time of jitted calls after a warm-up, and the achieved
bandwidth counted as the bytes of K and V that have to be read (the valid
slots only: ``2 * sum(lengths) * kv_heads * head_dim * itemsize``), against a
measured read bandwidth (a jitted sum over a large array, same dtype).
``--ragged`` draws each sequence's length uniformly from [1, cache] instead
of filling the cache: the XLA paths still read the whole cache, the kernel
only the valid tiles, spread evenly over its programs.

First the kernel (and the XLA path) against the float64 reference at small
sizes: compiled on a GPU or TPU, interpreted on CPU. Then on a GPU every timing
column is measured, including JAX's own Pallas decode kernel
(``jax.experimental.pallas.ops.gpu.decode_attention.gqa``) for comparison; on
a TPU every column but that one (the kernel is the Mosaic TPU one). On CPU
only XLA and the reference are timed; the kernel's columns read "not measured".
``--mosaic`` (GPU) adds the Mosaic GPU kernel (``implementation="pallas_mosaic_gpu"``,
the port from the deprecated Triton backend), which the compiled tests check first.

    .venv/bin/python experiments/benchmarks/kernels_decode_attention.py            # CPU defaults
    python experiments/benchmarks/kernels_decode_attention.py --caches 4096,8192,16384,32768 \\
        --batches 1,8 --heads 8,32 --dtype bfloat16                                 # GPU or TPU
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effformer.ops.decode_attention import decode_attention

sys.path.insert(0, str(Path(__file__).parent))
from kernel_baselines import accelerator, failure, reference_device  # noqa: E402
from timing import median_seconds  # noqa: E402

NOT_MEASURED = "not measured"


def _median_seconds(fn, repeats: int) -> float:
    return median_seconds(fn, repeats=repeats)


def measured_read_bandwidth(dtype, repeats: int) -> float:
    """Bytes per second of a jitted sum over 256M elements (GPU, TPU) / 64M (CPU)."""
    size = (1 << 28) if accelerator() else (1 << 26)
    x = jax.random.normal(jax.random.key(1), (size,), dtype)  # not constant data
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    return size * x.dtype.itemsize / _median_seconds(lambda: total(x), repeats)


def _inputs(batch, cache, heads, kv_heads, head_dim, dtype, ragged, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, cache, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, cache, kv_heads, head_dim), dtype)
    if ragged:
        lengths = jax.random.randint(keys[3], (batch,), 1, cache + 1)
    else:
        lengths = jnp.full((batch,), cache)
    return q, k, v, lengths.astype(jnp.int32)


def correctness_rows() -> list[str]:
    """Max |float32 kernel - float64 reference| at small sizes, as table rows.

    The kernel runs compiled on a GPU or TPU, interpreted on CPU; head_dim 128
    (the TPU kernel's lane width; other head dims fall back to XLA there).
    """
    rows = []
    for batch, cache, heads, kv_heads, block_k, splits, lengths in (
        (2, 300, 8, 2, 64, 1, (0, 300)),
        (3, 130, 4, 4, 32, 3, (65, 1, 130)),
        (1, 1000, 8, 1, 128, 4, (777,)),
    ):
        q, k, v, _ = _inputs(batch, cache, heads, kv_heads, 128, jnp.float32, False)
        lengths = jnp.asarray(lengths, jnp.int32)
        with reference_device():
            as64 = [np.asarray(x, np.float64) for x in (q, k, v)]
            reference = decode_attention(*as64, np.asarray(lengths), implementation="reference")
            reference = np.asarray(reference)
        cells = []
        for implementation in ("xla", "pallas"):
            try:
                out = decode_attention(
                    q, k, v, lengths, implementation=implementation, num_splits=splits,
                    block_k=block_k,
                )  # fmt: skip
                cells.append(f"{np.abs(np.asarray(out, np.float64) - reference).max():.1e}")
            except Exception as error:  # e.g. a compiler rejecting a case: say so, go on
                cells.append(failure(error))
        rows.append(
            f"| {batch} | {cache} | {heads} | {kv_heads} | {lengths.tolist()} | {block_k} | "
            f"{splits} | {cells[0]} | {cells[1]} |"
        )
    return rows


def _jax_pallas_gqa():
    """JAX's bundled Pallas (Triton) decode kernel, or None where it cannot be imported."""
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
    except ImportError:
        return None
    return jax_decode.gqa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    backend = accelerator()
    parser.add_argument("--caches", default="4096,8192,16384,32768" if backend else "4096,16384")
    parser.add_argument("--batches", default="1,8" if backend else "1,4")
    parser.add_argument("--heads", default="8,32" if backend else "8")
    parser.add_argument("--group", type=int, default=1, help="query heads per kv head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16" if backend else "float32")
    parser.add_argument("--ragged", action="store_true")
    parser.add_argument("--repeats", type=int, default=20 if backend else 5)
    parser.add_argument(
        "--mosaic", action="store_true", help="also time the Mosaic GPU kernel (GPU)"
    )
    args = parser.parse_args()
    if args.mosaic and backend != "gpu":
        parser.error("--mosaic times the Mosaic GPU kernel: it needs a GPU.")
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), dtype {dtype.name}, "
        f"head_dim {args.head_dim}, {'ragged' if args.ragged else 'full'} caches\n"
    )

    mode = "compiled" if backend else "interpret mode"
    print(f"Correctness ({mode}; float32 kernel vs float64 reference, head_dim 128): max |error|\n")
    print("| batch | cache | heads | kv heads | lengths | block_k | num_splits | xla | pallas |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(correctness_rows()) + "\n")

    peak = measured_read_bandwidth(dtype, args.repeats)
    print(f"measured read bandwidth (jitted sum): {peak / 1e9:.1f} GB/s\n")
    jax_gqa = _jax_pallas_gqa() if backend == "gpu" else None
    header = [
        "batch",
        "cache",
        "heads",
        "kv heads",
        "K/V MB read",
        "reference ms",
        "xla ms",
        "xla GB/s",
        "pallas ms",
        "pallas GB/s",
        "pallas % of read bw",
        "jax gqa ms",
    ] + (["mosaic ms", "mosaic GB/s"] if args.mosaic else [])
    print("| " + " | ".join(header) + " |")
    print("|" + " ---: |" * len(header))
    for batch in map(int, args.batches.split(",")):
        for heads in map(int, args.heads.split(",")):
            kv_heads = heads // args.group
            for cache in map(int, args.caches.split(",")):
                q, k, v, lengths = _inputs(
                    batch, cache, heads, kv_heads, args.head_dim, dtype, args.ragged
                )
                valid_bytes = 2 * int(lengths.sum()) * kv_heads * args.head_dim * dtype.itemsize

                def timed(implementation, q=q, k=k, v=v, lengths=lengths):
                    run = jax.jit(
                        functools.partial(decode_attention, implementation=implementation)
                    )
                    return _median_seconds(lambda: run(q, k, v, lengths), args.repeats)

                reference = timed("reference")
                xla = timed("xla")
                cells = [
                    batch,
                    cache,
                    heads,
                    kv_heads,
                    f"{valid_bytes / 1e6:.0f}",
                    f"{reference * 1e3:.2f}",
                    f"{xla * 1e3:.2f}",
                    f"{valid_bytes / xla / 1e9:.1f}",
                ]
                if backend:
                    pallas = timed("pallas")
                    cells += [
                        f"{pallas * 1e3:.3f}",
                        f"{valid_bytes / pallas / 1e9:.1f}",
                        f"{100 * valid_bytes / pallas / peak:.0f}%",
                    ]
                    if jax_gqa is not None and cache % 16 == 0:
                        gqa = jax.jit(jax_gqa)
                        seconds = _median_seconds(
                            lambda gqa=gqa, q=q, k=k, v=v, lengths=lengths: gqa(
                                q[:, 0], k, v, kv_seq_len=lengths
                            ),
                            args.repeats,
                        )
                        cells.append(f"{seconds * 1e3:.3f}")
                    else:
                        cells.append(NOT_MEASURED)
                    if args.mosaic:
                        try:
                            mosaic = timed("pallas_mosaic_gpu")
                        except Exception as error:  # first runs on new hardware: report it
                            cells += [failure(error), ""]
                        else:
                            cells += [f"{mosaic * 1e3:.3f}", f"{valid_bytes / mosaic / 1e9:.1f}"]
                else:
                    cells += [NOT_MEASURED] * 4
                print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
