"""Effectively unbounded memory: passkeys planted in up to 1M tokens, found through decode.

    python benchmarks/needle_memory.py --checkpoint runs/tiny_retrieval
    python benchmarks/needle_memory.py --checkpoint runs/tiny --history 10k,100k,1M --probes 2 \\
        --depths 0.1,0.5,0.9 --split held_out --out needles.json

For each history length L, needle depth d (a fraction of L) and probe: BOS and L - 1 tokens of
held-out text (the run's validation split, or ``--data``; documents concatenated, tiled when
shorter) with a passkey planted at depth d (``tasks.passkey``) are ingested, up to and including
the question, into a fresh memory on disk by the path ``decode.py ingest`` takes
(``mcj.load(...).session(...)``, ``ingest_ids``). Then, as at decode time, the session refocuses
(LensNet + allocator; the ingest's own refocus is round 1, and rounds go on until one makes no
edit, or ``--max-rounds``) and decodes greedily as many tokens as the key has (5 digits for
bytes); the probe is correct when they are the key's tokens.

Prints one row per (length, depth): keys found / probes, mean refocus rounds, the WC's reach (the
newest tokens its entries cover: ``history - horizon``), the level of detail of the key's digits
in the WC the answer is read from (``L0``: tokens, ``L1``...: gists, ``out``: before the horizon,
in the memory but out of the WC's reach: a WC of W entries of K^levels tokens reaches W K^levels
tokens at most), and ms per token of ingest and of decode (the median of the answer's tokens;
every K-th includes a refocus); then one row per length over all depths. Writes a JSON (default
``CHECKPOINT/needle_memory.json``, rewritten after every probe) with every probe's record, the
arguments, versions and the checkpoint's step. ``--keep DIR`` keeps each probe's memory (with its
refocus telemetry and LOD map) for ``decode.py --memory DIR/L..._d..._p...``.

Cost: ingest dominates. On a 2-core CPU the tiny config (K=8, W=64, D=128) ingests ~28K tokens/s
(0.036 ms/token, 36 s per 1M) and decodes a token in ~6-8 ms (random weights, measured), so the
default, 2 probes x 3 depths x (10K + 100K + 1M) = 6.7M tokens, takes about 5 minutes (more on a
busy machine); ``--history 10k,100k`` under a minute. A warm-up probe of the shortest length
compiles first (not in the table; ``--no-warmup`` times compilation too). Each probe's memory takes
~30 bytes/token on disk (tiny config) while it runs.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megacontext_jax.cli import HelpFormatter, OneLineParser, at_least

DEFAULT_OUT = "needle_memory.json"
SUFFIXES = {"k": 1_000, "m": 1_000_000}


# -- arguments -------------------------------------------------------------------------------
def token_counts(text: str) -> list[int]:
    """An argparse type: distinct token counts >= 1 separated by commas (``10000``, ``10k``,
    ``1M``)."""
    counts = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        scale = SUFFIXES.get(part[-1:], 1)
        digits = part[:-1] if scale > 1 else part
        counts.append(int(digits) * scale if digits.isdigit() else 0)
    if not counts or min(counts) < 1 or len(set(counts)) < len(counts):
        raise argparse.ArgumentTypeError(
            f"must be distinct token counts >= 1 (e.g. 10000 or 10k) separated by commas, "
            f"got {text!r}"
        )
    return counts


def fractions(text: str) -> list[float]:
    """An argparse type: distinct numbers in [0, 1] separated by commas."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 <= v <= 1 for v in values) or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(
            f"must be distinct numbers in [0, 1] separated by commas, got {text!r}"
        )
    return values


def parse(argv: list[str]) -> argparse.Namespace:
    from megacontext_jax.data.tasks import PHRASINGS

    p = OneLineParser(
        prog="python benchmarks/needle_memory.py",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a MegaContext training workdir")
    p.add_argument(
        "--history",
        type=token_counts,
        default="10000,100000,1000000",
        help="history lengths L in tokens (question included)",
    )
    p.add_argument(
        "--depths",
        type=fractions,
        default="0.1,0.5,0.9",
        help="needle depths, fractions of L",
    )
    p.add_argument("--probes", type=at_least(1), default=2, help="probes per length and depth")
    p.add_argument(
        "--split",
        choices=tuple(PHRASINGS),
        default="train",
        help="passkey phrasings: those training planted, or the held-out ones",
    )
    p.add_argument(
        "--data", help="filler: a directory of text files or .jsonl (default: held-out split)"
    )
    p.add_argument(
        "--max-rounds",
        type=at_least(1),
        default=8,
        help="refocus rounds at most before decoding (the ingest's own included)",
    )
    p.add_argument(
        "--lens",
        choices=("auto", "on", "off"),
        default="auto",
        help="LensNet + allocator: as the session decides (on once trained), always, never "
        "(the recency pyramid alone)",
    )
    p.add_argument("--seed", type=at_least(0), default=0, help="filler offsets and passkeys")
    p.add_argument("--out", help=f"JSON results (default: CHECKPOINT/{DEFAULT_OUT})")
    p.add_argument("--keep", help="keep each probe's memory under this directory")
    p.add_argument("--no-warmup", action="store_true", help="time the compilation too")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-probe lines")
    return p.parse_args(argv)


# -- histories -------------------------------------------------------------------------------
def needed_length(tokenizer, split: str) -> int:
    """The shortest probe length with room for every passkey phrasing of ``split`` (the
    question, the needle and one filler token on each side of it)."""
    from megacontext_jax.data.tasks import PHRASINGS

    key = len(tokenizer.encode("00000"))
    lengths = [
        len(tokenizer.encode(ph.question))
        + len(tokenizer.encode(ph.needle[0]))
        + len(tokenizer.encode(ph.needle[1]))
        + 2 * key
        + 2
        for ph in PHRASINGS[split]
    ]
    return max(lengths)


def filler_tokens(model, data: str | None) -> np.ndarray:
    """The held-out documents (``data``, or the run's validation split) as one id sequence."""
    from megacontext_jax.data.pipeline import evaluation_documents

    docs = evaluation_documents(model.config.data, model.tokenizer, data)
    return np.concatenate([d.data.astype(np.int32) for d in docs])


def make_probe(filler: np.ndarray, length: int, depth: float, split: str, rng, model):
    """A passkey probe of ``length`` tokens: BOS, a window of ``filler`` at a random offset
    (tiled if the filler is shorter) with the needle planted at ``depth``, and the question and
    answer at the end. Returns the probe and whether the filler was tiled."""
    from megacontext_jax.data import tasks

    need = length - 1
    tiled = len(filler) < need
    if tiled:
        filler = np.resize(filler, need + len(filler))
    offset = int(rng.integers(0, len(filler) - need + 1))
    text = np.concatenate([[model.tokenizer.bos_id], filler[offset : offset + need]])
    probe = tasks.passkey(text, length, rng, depth, model.tokenizer, split)
    return probe, tiled


def needle_lod(ents: list[tuple[int, int]], span: tuple[int, int], k: int) -> int:
    """Coarsest level of detail of the WC entries over ``span`` (-1: some of it lies before
    the WC's horizon, out of its reach)."""
    if not ents or span[0] < ents[0][1]:
        return -1
    over = [lod for lod, start in ents if start < span[1] and start + k**lod > span[0]]
    return max(over) if over else -1


# -- one probe -------------------------------------------------------------------------------
def _ingest(session, ids: np.ndarray, quiet: bool) -> None:
    """``session.ingest_ids`` with a progress bar on stderr when the history is long (as
    ``decode.py ingest``)."""
    from tqdm import tqdm

    from megacontext_jax.memory.tree import APPEND_PIECE

    if quiet or len(ids) <= APPEND_PIECE:
        session.ingest_ids(ids)
        return
    with tqdm(
        total=len(ids), unit="tok", unit_scale=True, desc="ingest", leave=False, file=sys.stderr
    ) as bar:
        session.ingest_ids(ids, bar.update)


def _edits(record: dict) -> int:
    return record["expands"] + record["collapses"]


def timed(tokens) -> tuple[list[int], list[float]]:
    """The ids of a token generator and the ms each took (the last includes the commit)."""
    ids, ms = [], []
    start = time.perf_counter()
    for token in tokens:
        ids.append(token)
        ms.append(round(1e3 * (time.perf_counter() - start), 3))
        start = time.perf_counter()
    if ms:
        ms[-1] += round(1e3 * (time.perf_counter() - start), 3)
    return ids, ms


def run_probe(model, probe, memory: Path, args: argparse.Namespace, log) -> dict:
    """Ingests ``probe``'s history into a fresh memory at ``memory``, refocuses, decodes the
    answer; returns the probe's record."""
    k = model.config.mc.block_size
    history = probe.tokens[: probe.answer[0]]
    key_ids = [int(t) for t in probe.tokens[probe.answer]]
    with model.session(memory, telemetry=True, log=log) as s:
        session = s.session
        if args.lens != "auto":
            session.use_lens = args.lens == "on"
        start = time.perf_counter()
        _ingest(s, history, args.quiet)
        ingest_s = time.perf_counter() - start
        rounds = list(s.telemetry.records)  # the ingest's own refocus
        lod_ingest = needle_lod(session.entries, probe.source, k)
        while len(rounds) < args.max_rounds and (not rounds or _edits(rounds[-1])):
            rounds.append(session.refocus())
        lod = needle_lod(session.entries, probe.source, k)
        count, horizon = len(session.entries), session.horizon
        answer = s.stream_ids(max_new_tokens=len(key_ids), temperature=0.0, top_k=0)
        generated, decode_ms = timed(answer)  # greedy
        num_tokens = s.num_tokens
    decode = model.tokenizer.decode
    return {
        "key": decode(key_ids),
        "key_tokens": key_ids,
        "generated": decode(generated),
        "generated_tokens": generated,
        "correct": generated == key_ids,
        "needle": [int(i) for i in probe.needle],
        "source": [int(i) for i in probe.source],
        "needle_text": decode(probe.tokens[probe.needle[0] : probe.needle[1]]),
        "ingested": len(history),
        "memory_tokens": num_tokens,
        "lens": session.use_lens,
        "refocus_rounds": len(rounds),
        "edits": [[r["expands"], r["collapses"]] for r in rounds],
        "needle_lod_ingest": lod_ingest,
        "needle_lod": lod,
        "wc_entries": count,
        "horizon": horizon,
        "ingest_ms_per_token": 1e3 * ingest_s / len(history),
        "refocus_ms": [round(sum(r["ms"].values()), 3) for r in rounds],
        "decode_ms": decode_ms,
        "decode_ms_per_token": float(np.median(decode_ms)) if decode_ms else None,
    }


# -- summary ---------------------------------------------------------------------------------
def lod_name(lod: int) -> str:
    return "out" if lod < 0 else f"L{lod}"


def summarize(records: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """One row per distinct value of ``keys`` (in first-seen order): found / probes, mean
    rounds, the needle's LOD counts and mean ms per token."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[key] for key in keys), []).append(r)
    rows = []
    for values, group in groups.items():
        lods: dict[str, int] = {}
        for r in sorted(group, key=lambda r: r["needle_lod"]):
            lods[lod_name(r["needle_lod"])] = lods.get(lod_name(r["needle_lod"]), 0) + 1
        rows.append(
            {
                **dict(zip(keys, values, strict=True)),
                "found": sum(r["correct"] for r in group),
                "probes": len(group),
                "accuracy": float(np.mean([r["correct"] for r in group])),
                "mean_rounds": float(np.mean([r["refocus_rounds"] for r in group])),
                "needle_lod": lods,
                "reach": _mean(r["ingested"] - r["horizon"] for r in group),
                "ingest_ms_per_token": float(np.mean([r["ingest_ms_per_token"] for r in group])),
                "decode_ms_per_token": _mean(r["decode_ms_per_token"] for r in group),
            }
        )
    return rows


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def print_table(results: dict) -> None:
    run = results["run"]
    wc = run["working_context"]
    lens = "LensNet + allocator" if run["lens"] else "recency pyramid (no LensNet)"
    print(
        f"needle in memory: {run['checkpoint']} (step {run['step']}), W={wc['W']} K={wc['K']} "
        f"levels {wc['max_level']}, {lens}, {run['arguments']['split']} phrasings"
    )
    head = f"{'history':>9} {'depth':>5} {'found':>7} {'rounds':>6} {'WC reach':>9}"
    head += f"  {'key digits in WC':<18} {'ingest ms/tok':>13} {'decode ms/tok':>13}"
    print(head)
    rows = [*results["summary"]["by_depth"], *results["summary"]["by_history"]]
    for n, row in enumerate(rows):
        if n == len(results["summary"]["by_depth"]):
            print("-" * len(head))
        depth = f"{row['depth']:.2f}" if "depth" in row else "all"
        lods = " ".join(f"{name}:{c}" for name, c in row["needle_lod"].items())
        print(
            f"{row['history']:>9,} {depth:>5} {row['found']:>3}/{row['probes']:<3} "
            f"{row['mean_rounds']:>6.1f} {row['reach']:>9,.0f}  {lods:<18} "
            f"{row['ingest_ms_per_token']:>13.3f} "
            f"{row['decode_ms_per_token']:>13.1f}"
        )


# -- the run ---------------------------------------------------------------------------------
def check_output(path: Path) -> None:
    """Creates ``path``'s directory and checks that ``path`` can be written, before any compute."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise ValueError(f"the output {path} is a directory")
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ValueError(f"cannot write the output {path}: {e.strerror}") from None


def run_header(model, args: argparse.Namespace, argv: list[str], filler: np.ndarray) -> dict:
    from megacontext_jax.evaluation.protocol import config_hash, versions

    mc = model.config.mc
    arguments = {
        "history": args.history,
        "depths": args.depths,
        "probes": args.probes,
        "split": args.split,
        "data": args.data,
        "max_rounds": args.max_rounds,
        "lens": args.lens,
        "seed": args.seed,
        "warmup": not args.no_warmup,
    }
    return {
        "checkpoint": str(model.path),
        "step": model.step,
        "config_hash": config_hash(model.config),
        "lens_trained": model.lens_trained,
        "lens": model.lens_trained if args.lens == "auto" else args.lens == "on",
        "working_context": {
            "W": mc.wc_size,
            "K": mc.block_size,
            "max_level": mc.max_level,
            "recent_tail": mc.recent_tail,
            "refocus_every": mc.refocus_every or mc.block_size,
        },
        "filler_tokens": len(filler),
        "arguments": arguments,
        "argv": list(argv),
        "versions": versions(),
    }


def probe_rng(seed: int, length: int, depth: float, probe: int) -> np.random.Generator:
    """The generator of one probe: the same probe whatever other lengths or depths run."""
    return np.random.default_rng([seed, length, round(depth * 1_000_000), probe])


def memory_name(length: int, depth: float, probe: int) -> str:
    return f"L{length}_d{depth:g}_p{probe}"


def measure(model, args, filler, memories: Path, log, cells, warmup: int | None):
    """Every probe's record (a generator), after an untimed warm-up probe of ``warmup`` tokens."""
    if warmup is not None:
        probe, _ = make_probe(filler, warmup, 0.5, args.split, probe_rng(args.seed, 0, 0, 0), model)
        with tempfile.TemporaryDirectory(prefix="needle-warmup-") as scratch:
            run_probe(model, probe, Path(scratch) / "memory", args, log)
    for length, depth, i in cells:
        probe, tiled = make_probe(
            filler, length, depth, args.split, probe_rng(args.seed, length, depth, i), model
        )
        name = memory_name(length, depth, i)
        record = run_probe(model, probe, memories / name, args, log)
        yield {"history": length, "depth": depth, "probe": i, "tiled": tiled, **record} | (
            {"memory": str(memories / name)} if args.keep else {}
        )


def check_keep(keep: str | None, cells: list[tuple[int, float, int]]) -> None:
    """A kept memory must be fresh: an existing one would be continued, not rebuilt."""
    for cell in cells if keep else ():
        if (Path(keep) / memory_name(*cell)).exists():
            raise ValueError(f"--keep {keep} already holds a memory {memory_name(*cell)}")


def probe_line(r: dict) -> str:
    outcome = "found" if r["correct"] else "missed"
    return (
        f"L={r['history']:,} depth {r['depth']:g} probe {r['probe']}: key {r['key']!r} got "
        f"{r['generated']!r} ({outcome}; digits at {lod_name(r['needle_lod'])} after "
        f"{r['refocus_rounds']} rounds)"
    )


def run(args: argparse.Namespace, argv: list[str], out: Path, log) -> dict:
    """Every probe of ``args``; writes the results to ``out`` after each and returns them."""
    import megacontext_jax as mcj

    model = mcj.load(args.checkpoint)
    if not model.is_megacontext:
        raise ValueError(
            f"{args.checkpoint} holds a plain language model: a memory needs a MegaContext "
            "checkpoint (trained with --config.mc.enabled=true)"
        )
    need = needed_length(model.tokenizer, args.split)
    if min(args.history) < need:
        raise ValueError(
            f"--history {min(args.history)} is shorter than the {need} tokens a passkey of the "
            f"{args.split} phrasings needs"
        )
    cells = [(n, d, i) for n in args.history for d in args.depths for i in range(args.probes)]
    check_keep(args.keep, cells)
    check_output(out)
    filler = filler_tokens(model, args.data)
    results = {"run": run_header(model, args, argv, filler), "summary": {}, "records": []}
    warmup = None if args.no_warmup else min(args.history)  # every shape compiles there
    with tempfile.TemporaryDirectory(prefix="needle-memory-") as scratch:
        memories = Path(args.keep) if args.keep else Path(scratch)
        for record in measure(model, args, filler, memories, log, cells, warmup):
            results["records"].append(record)
            results["summary"] = {
                "by_depth": summarize(results["records"], ("history", "depth")),
                "by_history": summarize(results["records"], ("history",)),
            }
            out.write_text(json.dumps(results, indent=1))
            if not args.quiet:
                print(probe_line(record), file=sys.stderr)
    return results


def main(argv: list[str]) -> int:
    args = parse(argv)
    import megacontext_jax as mcj
    from megacontext_jax.data.pipeline import DataError

    out = Path(args.out) if args.out else Path(args.checkpoint) / DEFAULT_OUT
    notes: set[str] = set()

    def log(line: str) -> None:  # the session's notes (an untrained LensNet), once each
        if line not in notes:
            notes.add(line)
            print(line, file=sys.stderr)

    try:
        results = run(args, argv, out, log)
    except (mcj.CheckpointError, mcj.TreeError, mcj.SessionError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_table(results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
