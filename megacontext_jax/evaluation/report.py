"""The evaluation's printed tables and its PNGs (``protocol.evaluate`` makes the results)."""

import math
from pathlib import Path

import numpy as np

from megacontext_jax.evaluation.scoring import CONDITIONS, ORACLE

RETRIEVAL_CONDITIONS = (*CONDITIONS, ORACLE)


def _pm(m: dict) -> str:
    return "-" if m["n"] == 0 else f"{m['mean']:7.4f} ± {m['se']:.4f}"


def _interval(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:+.4f} ± {m['se']:.4f} [{lo:+.4f}, {hi:+.4f}]"


def _ratio(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def print_text(length: str, row: dict, threshold: float) -> None:
    """One length's block: conditions x {NLL, key-token NLL, bpb, gap recovered}, then the
    paired differences on all tokens and on key tokens with SEs and 95% intervals."""
    print(
        f"{length}: {row['windows']} windows of {row['documents']} documents, {row['tokens']} "
        f"scored tokens, {row['key_tokens']} key tokens (full beats window by > {threshold} nats)"
    )
    print(
        f"  {'condition':<10} {'nll':>16} {'key-token nll':>16} {'bpb':>7} "
        f"{'gap_rec':>8} {'key gap_rec':>12}"
    )
    gap = row["gap_recovered"]
    for c, v in row["conditions"].items():
        print(
            f"  {c:<10} {_pm(v['nll']):>16} {_pm(v['key_nll']):>16} {v['bpb']:7.4f} "
            f"{_ratio(gap['all'].get(c)):>8} {_ratio(gap['key'].get(c)):>12}"
        )
    intervals = [
        f"{c} {_ratio(lo)}..{_ratio(hi)}"
        for c, (lo, hi) in row["gap_recovered_ci95"]["all"].items()
        if not math.isnan(lo)
    ]
    if intervals:
        print("  gap recovered, bootstrap 95% intervals (all tokens): " + ", ".join(intervals))
    if row["documents"] < 2:
        print("  (windows of one document: no standard error or interval)")
    # Key tokens are picked where window does badly, so a key-token difference against window
    # (or full) flatters the other side by selection; those between MC conditions do not.
    print(
        "  paired differences (nats; ± SE over documents, bootstrap 95% interval; key-token"
        " differences against window are biased by the selection):"
    )
    for name, d in row["differences"].items():
        key = _interval(d["key"]) if d["key"]["n"] else "-"
        print(f"    {name:<20} all {_interval(d['all'])}   key {key}")


def print_budget(curve: dict) -> None:
    budgets = curve["budgets"]
    print(f"budget curve at {curve['length']}: NLL by budget W (entries)")
    print(f"  {'condition':<10} " + " ".join(f"{w:>8}" for w in budgets))
    for c, values in curve["nll"].items():
        print(f"  {c:<10} " + " ".join(f"{v:8.4f}" for v in values))
    for w, why in curve["skipped"].items():
        print(f"  W={w} skipped: {why}")
    effective = curve.get("effective_window", {})
    if effective:
        parts = []
        for c, e in effective.items():
            if e["value"] is not None:
                parts.append(f"{c} {e['value']:.1f}")
            elif e["bound"] == "below":
                parts.append(f"{c} < {budgets[0]}")
            else:
                parts.append(f"{c} > {budgets[-1]}")
        print("  effective window (the W at which window matches each): " + ", ".join(parts))


def print_retrieval(retrieval: dict) -> None:
    names = RETRIEVAL_CONDITIONS
    print("retrieval accuracy (answer tokens all right; n probes per cell)")
    print(f"  {'task':<17} {'length':>6} " + " ".join(f"{c:>9}" for c in names) + "  fits")
    for task, rows in retrieval.items():
        for length, r in rows.items():
            if "skipped" in r:
                print(f"  {task:<17} {length:>6} skipped: {r['skipped']}")
                continue
            acc = r["accuracy"]
            cells = " ".join(f"{acc[c]['mean']:9.3f}" if c in acc else f"{'-':>9}" for c in names)
            fits = f"{r['oracle_fits']:.3f}" if "oracle_fits" in r else "-"
            print(f"  {task:<17} {length:>6} {cells}  {fits}  (n={r['probes']})")


def print_substitutability(sub: dict) -> None:
    print(
        f"substitutability over {sub['documents']} documents: ΔNLL (nats per token) of the 32 tokens"
    )
    print(f"after a span, vs the span as tokens (NLL {sub['tokens_nll']:.4f}):")
    for level in (1, 2):
        print(
            f"  LOD{level} span: gist {sub[f'lod{level}_gist']:+.4f}   "
            f"dropped {sub[f'lod{level}_dropped']:+.4f}"
        )


def print_results(results: dict) -> None:
    threshold = results.get("run", {}).get("arguments", {}).get("key_threshold", 0.5)
    for length, row in results["text"].items():
        print_text(length, row, threshold)
    if "budget" in results:
        print_budget(results["budget"])
    print_retrieval(results["retrieval"])
    if "substitutability" in results:
        print_substitutability(results["substitutability"])


def plot(results: dict, path: Path) -> list[Path]:
    """Writes ``path`` (NLL by length and condition, passkey accuracy by length), and beside it
    ``*_budget.png`` (the budget curves) and ``*_depth.png`` (the passkey's depth x length
    accuracy per condition); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # no display: before pyplot is imported
    import matplotlib.pyplot as plt

    written = [path]
    lengths = list(results["text"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for c in CONDITIONS:
        ys = [results["text"][m]["conditions"].get(c, {}).get("bpb") for m in lengths]
        if any(y is not None for y in ys):
            ax1.plot(lengths, ys, marker="o", label=c)
    passkey = results["retrieval"].get("passkey", {})
    for c in RETRIEVAL_CONDITIONS:
        xs = [m for m, r in passkey.items() if c in r.get("accuracy", {})]
        if xs:
            ax2.plot(xs, [passkey[m]["accuracy"][c]["mean"] for m in xs], marker="o", label=c)
    ax1.set_title("scored tokens: bits per byte")
    ax2.set_title("passkey accuracy")
    ax2.set_ylim(-0.05, 1.05)
    for ax in (ax1, ax2):
        ax.set_xlabel("history length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if results.get("budget", {}).get("budgets"):
        written.append(
            _plot_budget(plt, results["budget"], path.with_name(path.stem + "_budget.png"))
        )
    if any("by_depth" in r for r in passkey.values()):
        written.append(_plot_depth(plt, passkey, path.with_name(path.stem + "_depth.png")))
    return written


def _plot_budget(plt, curve: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, values in curve["nll"].items():
        ax.plot(curve["budgets"], values, marker="o", label=c)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget W (entries)")
    ax.set_ylabel("NLL (nats per token)")
    ax.set_title(f"budget curves at {curve['length']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_depth(plt, passkey: dict, path: Path) -> Path:
    rows = {m: r for m, r in passkey.items() if "by_depth" in r}
    names = [c for c in RETRIEVAL_CONDITIONS if any(c in r["by_depth"] for r in rows.values())]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3), squeeze=False)
    for ax, c in zip(axes[0], names, strict=True):
        grid = np.array(
            [[np.nan if a is None else a for a, _ in rows[m]["by_depth"][c]] for m in rows]
        ).T
        image = ax.imshow(grid, vmin=0, vmax=1, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(rows)), list(rows))
        ax.set_yticks(
            range(grid.shape[0]), [f"{i / grid.shape[0]:.1f}" for i in range(grid.shape[0])]
        )
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("history length")
    axes[0][0].set_ylabel("needle depth (from)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="passkey accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
