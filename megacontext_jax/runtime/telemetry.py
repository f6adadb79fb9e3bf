"""Decode telemetry: one JSONL record per refocus, and the level-of-detail map over time.

The map (``plot_lod_map``) shows, for every refocus (x: decode step), which level of detail the
working context holds for each region of the history (y: token position); white is outside the WC
(beyond the horizon, or not yet written).
"""

import json
from pathlib import Path

import numpy as np


class Telemetry:
    """Appends records to ``path`` (JSONL, one per refocus) and keeps this run's in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def lod_grid(
    records: list[dict], block_size: int, rows: int = 256
) -> tuple[np.ndarray, tuple[int, int]]:
    """``[rows, len(records)]`` LOD of the entry covering each history bin (NaN: none), and the
    token range ``(lo, hi)`` the rows span: from the earliest horizon to the longest history."""
    lo = min(r["entries"][0][1] for r in records if r["entries"])
    hi = max(r["num_tokens"] for r in records)
    edges = np.linspace(lo, hi, rows + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    grid = np.full((rows, len(records)), np.nan)
    for col, record in enumerate(records):
        ents = np.asarray(record["entries"], np.int64).reshape(-1, 2)
        lod, start = ents[:, 0], ents[:, 1]
        end = start + block_size**lod
        which = np.searchsorted(start, centres, side="right") - 1
        inside = (which >= 0) & (centres < end[np.maximum(which, 0)])
        grid[inside, col] = lod[which[inside]]
    return grid, (lo, hi)


def plot_lod_map(records: list[dict], block_size: int, path: str | Path) -> None:
    """Writes the LOD map of ``records`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, (lo, hi) = lod_grid(records, block_size)
    steps = [r["step"] for r in records]
    levels = max(len(r["lod_hist"]) for r in records)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    image = ax.imshow(
        grid,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap=plt.get_cmap("viridis", levels),
        vmin=-0.5,
        vmax=levels - 0.5,
        extent=(min(steps) - 0.5, max(steps) + 0.5, lo, hi),
    )
    fig.colorbar(image, ax=ax, ticks=range(levels), label="level of detail (0 = tokens)")
    ax.set_xlabel("decode step")
    ax.set_ylabel("history position (tokens)")
    ax.set_title("working context level of detail per refocus")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
