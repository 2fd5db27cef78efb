"""Where metrics go: the console, ``metrics.jsonl`` and TensorBoard event files.

Only process 0 writes. Each record is ``{"step": int, "split": str, name: value, ...}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax


class MetricWriter:
    """Writes scalar metrics to a JSON-lines file and TensorBoard in ``workdir``.

    ``resume_step``: the step training (re)starts from. Records of later steps, written
    by an earlier run that was killed after its last checkpoint, are dropped (from
    ``metrics.jsonl`` now, from TensorBoard by its purge mechanism), so the steps run
    again are not recorded twice. None keeps every record (readers, tests).
    """

    def __init__(
        self, workdir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None
    ):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and resume_step is not None:
            self._drop_records_after(resume_step)
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=purge)

    def _drop_records_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) == len(lines):
            return
        # Written beside and renamed over: a kill mid-write must not truncate the history.
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(self.path)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (optionally one split), in order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


class ProgressBar:
    """One console line: step, steps/s, examples/s, ETA and the latest loss."""

    def __init__(
        self, total_steps: int, start_step: int, examples_per_step: int, enabled: bool = True
    ):
        self.total, self.start = total_steps, start_step
        self.examples_per_step = examples_per_step
        self.enabled = enabled and jax.process_index() == 0
        self.tty = sys.stdout.isatty()
        self._t0 = time.perf_counter()
        self._first_step: int | None = None

    def update(self, step: int, loss: float, force_newline: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if (
            self._first_step is None
        ):  # Measure speed from the first completed step (after compiling).
            self._first_step, self._t0 = step, now
            rate = 0.0
        else:
            rate = (step - self._first_step) / max(now - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"{rate:.2f} steps/s {rate * self.examples_per_step:.0f} ex/s "
            f"ETA {_format_seconds(eta)} loss {loss:.4f}"
        )
        if self.tty and not force_newline:
            print("\r" + line, end="", flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print()


def _format_seconds(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet.
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:d}:{secs:02d}"
