"""The evaluation's printed table and its PNG (``evaluation.py`` makes the results)."""

from pathlib import Path

from megacontext_jax.scoring import CONDITIONS


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


def _accuracy(row: dict, condition: str) -> str:
    value = row.get(condition)
    return "-" if not isinstance(value, float) else f"{value:.3f}"


def print_table(results: dict) -> None:
    print(
        f"{'length':>7} {'condition':>10} {'nll':>8} {'bpb':>8} {'gap_rec':>8} {'passkey':>8} {'mqar':>8}"
    )
    for length, row in results["conditions"].items():
        for c in CONDITIONS:
            if c not in row:
                continue
            gap = row["gap_recovered"].get(c)
            print(
                f"{length:>7} {c:>10} {row[c]['nll']:8.4f} {row[c]['bpb']:8.4f} "
                f"{'' if gap is None else f'{gap:8.3f}':>8} "
                f"{_accuracy(results['passkey'][length], c):>8} "
                f"{_accuracy(results['mqar'][length], c):>8}"
            )
        diffs = "; ".join(
            f"{name} {d['mean']:+.4f} ± {d['se']:.4f}" for name, d in row["differences"].items()
        )
        print(f"{length:>7} paired over {row['documents']} documents: {diffs}")
        oracle = results["passkey_oracle"].get(length)
        if oracle:
            print(
                f"{length:>7} passkey with the digits brought to LOD0 (oracle focus): "
                f"{oracle['accuracy']:.3f}; they fit the budget in {oracle['fits_budget']:.3f}"
            )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: before pyplot is imported
    import matplotlib.pyplot as plt

    lengths = list(results["conditions"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for c in CONDITIONS:
        ys = [results["conditions"][m].get(c, {}).get("bpb") for m in lengths]
        if any(y is not None for y in ys):
            ax1.plot(lengths, ys, marker="o", label=c)
        acc = [results["passkey"][m].get(c) for m in lengths]
        if any(isinstance(a, float) for a in acc):
            ax2.plot(lengths, acc, marker="o", label=c)
    ax1.set_title("scored tokens: bits per byte")
    ax1.set_xlabel("history length")
    ax2.set_title("passkey accuracy")
    ax2.set_xlabel("history length")
    ax2.set_ylim(-0.05, 1.05)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
