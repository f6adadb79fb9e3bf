"""Metrics sinks: one JSON line per record, TensorBoard event files, and a loss-curve PNG.

Series (``metrics.jsonl`` keys; the same names in TensorBoard), one prefix per objective so that
no curve mixes two of them:

* ``curriculum/*``: the curriculum's steps; ``curriculum/loss`` is the base model's plain LM loss
  (nats per token) on the curriculum's short sequences.
* ``train/*``: the main phase of a plain LM (``mc.enabled=False``); ``train/loss`` in nats/token.
* ``mc/*``: the MegaContext phase. ``mc/objective`` is the weighted sum that is optimized (no
  unit); its parts (``mc/lm_tokens``, ``mc/lm_wc``, ``mc/kl``, ``mc/lens``, ...) are in nats per
  token, ``mc/lm_tokens`` being the base model's plain LM loss on the training sequences.
* ``*/grad_norm``, ``*/lr``, ``*/tokens_per_s`` (steps only: no compilation or validation).
* ``val/loss`` (nats/token) and ``val/bpb`` (bits per byte): the base model's plain LM loss on
  held-out sequences of ``data.seq_len`` tokens; ``val/unigram_bpb`` the unigram baseline.
"""

import json
import math
from collections.abc import Callable
from pathlib import Path

import jax


class MetricsWriter:
    """Writes ``{step, **metrics}`` to ``workdir/metrics.jsonl`` and ``workdir/tb``.

    One run, one file: resuming at step ``start`` drops the rows (and TensorBoard events) of
    steps after it, which the resumed run logs again; a run that starts at step 0 where an
    earlier run left metrics (its checkpoints gone) moves them aside, to ``metrics.previous.jsonl``
    and ``tb.previous`` (numbered if those exist), and says so through ``log``. Only process 0
    writes; other processes get a writer that does nothing.
    """

    def __init__(self, workdir: Path, start: int = 0, log: Callable[[str], None] = print):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start == 0 and self.path.exists() and self.path.stat().st_size:
                kept = _move_aside(self.path, Path(workdir) / "tb")
                log(f"note: {workdir} has metrics but no checkpoint; they are kept as {kept}")
            elif start and self.path.exists():
                rows = [r for r in read_metrics(self.path) if r["step"] <= start]
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                tmp.replace(self.path)
            self._file = self.path.open("a")
            self._tb = SummaryWriter(
                str(Path(workdir) / "tb"), purge_step=start + 1 if start else None
            )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        for k, v in values.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def text(self, tag: str, text: str) -> None:
        """A text record in TensorBoard (e.g. the run's config), shown as code."""
        if self.enabled:
            self._tb.add_text(tag, "\n".join("    " + line for line in text.splitlines()))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _move_aside(metrics: Path, tb: Path) -> str:
    """Renames an earlier run's ``metrics.jsonl`` and ``tb/`` out of the way; returns the new
    metrics file's name."""
    n = 0
    while (metrics.with_name(f"metrics.previous{n or ''}.jsonl")).exists():
        n += 1
    target = metrics.with_name(f"metrics.previous{n or ''}.jsonl")
    metrics.rename(target)
    if tb.exists():
        tb.rename(tb.with_name(f"tb.previous{n or ''}"))
    return target.name


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def latest_metrics(workdir: Path) -> dict[str, float]:
    """The latest value of every series in ``workdir/metrics.jsonl`` (empty if there is none)."""
    path = Path(workdir) / "metrics.jsonl"
    latest: dict[str, float] = {}
    if path.exists():
        for record in read_metrics(path):
            latest.update({k: v for k, v in record.items() if k != "step"})
    return latest


# (series, label) of each panel: the plain LM losses, all in nats per token, then the MegaContext
# objective and those of its parts that are not plain LM losses.
_LM_SERIES = (
    ("curriculum/loss", "curriculum: base LM loss (short sequences)"),
    ("train/loss", "train: LM loss"),
    ("mc/lm_tokens", "mc phase: base LM loss on raw tokens"),
    ("val/loss", "validation: base LM loss"),
)
_MC_SERIES = (
    ("mc/objective", "objective (weighted sum)"),
    ("mc/lm_wc", "LM loss on WC entries"),
    ("mc/kl", "KL to the full-token teacher"),
    ("mc/span_kl", "close-range KL"),
    ("mc/lens", "LensNet preference loss"),
)


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """The run's curves: plain LM losses (train phases and validation, nats per token) on the
    left, the MegaContext objective and its parts on the right (if the run has that phase)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)

    def series(key):
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        return tuple(zip(*points, strict=True)) if points else None

    has_mc = series("mc/objective") is not None
    fig, axes = plt.subplots(1, 2 if has_mc else 1, figsize=(12 if has_mc else 7, 4), squeeze=False)
    panels = [(axes[0, 0], _LM_SERIES, "plain LM loss (nats / token)")]
    if has_mc:
        panels.append((axes[0, 1], _MC_SERIES, "MegaContext phase (nats / token; objective: sum)"))
    curriculum_end = max((r["step"] for r in records if "curriculum/loss" in r), default=None)
    for ax, keys, title in panels:
        for key, label in keys:
            points = series(key)
            if points:
                ax.plot(*points, label=label, marker="o" if key.startswith("val") else None)
        if curriculum_end is not None and has_mc:
            ax.axvline(curriculum_end, color="grey", linestyle=":", label="end of curriculum")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
