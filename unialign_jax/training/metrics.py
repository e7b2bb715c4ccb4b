"""Training metrics: stdout, WORKDIR/metrics.jsonl, TensorBoard, and a loss-curve plot.

Only the main process writes. On resume, lines past the restored step (written after the
last checkpoint by the interrupted run) are dropped, so metrics.jsonl always describes one
uninterrupted history. The work dir may be a local path or a cloud URL (gs://...): files go
through `etils.epath`, and the JSONL is rewritten whole through `files.write_text`
(object stores cannot append; each version of the file is written atomically).
"""

from __future__ import annotations

import json
import logging
import math
import os

from etils import epath

from unialign_jax import files

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str) -> list[dict]:
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricWriter:
    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True,
                 enabled: bool = True, echo=print):
        self.enabled, self.echo = enabled, echo
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        logged = read_metrics(self.path)
        self._lines = [json.dumps(m) for m in logged if m["step"] <= resume_step]
        if len(self._lines) != len(logged):
            self._flush()  # drop what the interrupted run logged past its last checkpoint
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard logs "
                            "(pip install tensorboardX)")
            else:
                self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                         purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in sorted(metrics.items())}}
        self._lines.append(json.dumps(record))
        self._flush()
        self.echo(f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items()
                                              if k != "step"))
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def write_images(self, step: int, images: dict) -> None:
        """TensorBoard images, {tag: (H, W, 3) uint8 array or PIL image} (validation
        samples); nothing without TensorBoard or off the main process."""
        if self._tb is None:
            return
        import numpy as np

        for tag, image in images.items():
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
        self._tb.flush()

    def _flush(self) -> None:
        files.write_text(self.path, "".join(line + "\n" for line in self._lines))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def plot_losses(metrics_path: str, png_path: str, keys: tuple[str, ...] | None = None) -> bool:
    """Loss curves (one panel per loss term, six a row) as a PNG; False when matplotlib is
    missing. `keys` default: the loss terms of the first training row. A panel draws the
    rows that hold its key (eval/... terms are logged only every run.eval_every steps)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return False
    rows = read_metrics(metrics_path)
    if not rows:
        return False
    first = next((r for r in rows if "loss" in r), rows[0])  # not an eval-only row
    keys = keys or tuple(k for k in first if k.startswith("loss"))
    cols = min(len(keys), 6)
    rows_of_panels = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(3.2 * cols, 3 * rows_of_panels),
                             squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], lw=1,
                marker="o" if len(points) < 30 else None, ms=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    # Whole or not at all, on a local disk or in a bucket.
    files.write_atomic(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Counts the steps whose update the train step skipped (non-finite loss or gradient
    norm) and stops the run after `limit` in a row.

    The step's flag is read one step late (`settle(before=step)`), so that checking it
    never makes the host wait for the device: the next step is already queued.
    """

    def __init__(self, limit: int):
        self.limit, self.run, self.window = limit, 0, 0
        self._pending: list[tuple[int, object, dict]] = []

    def push(self, step: int, flag, batch_info: dict) -> None:
        """`flag`: the step's device scalar (1: skipped); `batch_info`: what to name if the
        run stops here (task, record indices)."""
        self._pending.append((step, flag, batch_info))

    def settle(self, before: int | None = None) -> None:
        """Reads the flags of the pending steps below `before` (all: None)."""
        import jax

        while self._pending and (before is None or self._pending[0][0] < before):
            step, flag, info = self._pending.pop(0)
            if float(jax.device_get(flag)) == 0.0:
                self.run = 0
                continue
            self.run += 1
            self.window += 1
            log.warning("step %d: non-finite loss or gradient norm; update skipped (%d in a "
                        "row)", step, self.run)
            if self.run >= self.limit:
                raise NonFiniteLoss(
                    f"{self.run} consecutive steps ({step - self.run + 1}..{step}) had a "
                    f"non-finite loss or gradient norm (run.max_nonfinite_steps="
                    f"{self.limit}). Their updates were skipped: the parameters are those of "
                    f"step {step - self.run}. Last bad batch: {info}. Lower optimizer.lr, "
                    "check that data, or raise run.max_nonfinite_steps")

    def take_window(self) -> int:
        """Skipped steps since the last call (the logged `nonfinite_steps`)."""
        count, self.window = self.window, 0
        return count
