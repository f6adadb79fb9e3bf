"""Metrics sinks: one JSON line per record, TensorBoard event files, and a loss-curve PNG."""

import json
import math
from pathlib import Path

import jax


class MetricsWriter:
    """Writes ``{step, **metrics}`` to ``workdir/metrics.jsonl`` and ``workdir/tb``.

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        for k, v in values.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Train and validation loss against step, from a metrics JSONL file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=label, marker="o" if key.startswith("val") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``: unlike ``ru_maxrss``, it starts
    afresh at exec, so a subprocess does not inherit its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: the closest measure there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
