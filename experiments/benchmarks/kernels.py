"""Every Pallas kernel's benchmark, one after the other, with default settings.

    .venv/bin/python experiments/benchmarks/kernels.py                 # all three
    .venv/bin/python experiments/benchmarks/kernels.py --kernels flash_attention

Each kernel has its own script (run it directly for its options, e.g. ``--sweep``
on a GPU or TPU to tune block sizes):

* ``kernels_flash_attention.py``: soft-causal / structured-mask flash attention
  vs the XLA path and cuDNN's causal attention;
* ``kernels_selective_scan.py``: the selective scan vs the best XLA scan;
* ``kernels_decode_attention.py``: split-K decode attention vs the XLA split-K
  path and the dense reference.

On CPU each prints interpret-mode correctness against the op's reference and
marks the timing columns "not measured"; on a GPU or TPU each checks the compiled
kernel against float64 references (on the host CPU) and measures every column,
with the platform's library attention (cuDNN / splash attention) as the yardstick
for flash attention (``kernel_baselines.py``).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

KERNELS = ("flash_attention", "selective_scan", "decode_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}"
    )
    args = parser.parse_args()
    chosen = [name.strip() for name in args.kernels.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(KERNELS))
    if unknown:
        parser.error(f"--kernels: unknown {unknown}; choose from {KERNELS}.")
    here = Path(__file__).parent
    for name in chosen:
        print(f"\n## {name}\n", flush=True)
        script = here / f"kernels_{name}.py"
        saved_argv, sys.argv = sys.argv, [str(script)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved_argv


if __name__ == "__main__":
    main()
