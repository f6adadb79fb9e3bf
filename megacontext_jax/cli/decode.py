"""Decodes from a trained checkpoint, streaming text; with --memory, over a persistent MegaContext.

    python decode.py --checkpoint runs/tiny --prompt "def fibonacci(n):"
    python decode.py --checkpoint runs/tiny --memory mem/ --prompt-file prompt.txt --max-new-tokens 400
    python decode.py --checkpoint runs/tiny --memory mem/ --interactive
    python decode.py ingest --checkpoint runs/tiny --memory mem/ --file big.txt

Without --memory the base model samples from the prompt alone (a plain LM, its context capped at
the training length). With --memory the prompt is ingested into the tree at MEMDIR (created if
new), the working context is assembled and refocused every ``mc.refocus_every`` tokens, and the
decoded tokens join the memory too: running again with the same MEMDIR continues it. Telemetry
(one JSONL record per refocus and a PNG of the level-of-detail map) goes to MEMDIR/telemetry.
--checkpoint also takes a local Hugging Face directory (a plain decoder, no memory).

This is ``megacontext_jax.api`` (``mcj.load``, ``Model.session``) on the command line.
"""

import argparse
import sys
import time
from pathlib import Path

from megacontext_jax.cli import HelpFormatter

INGEST_USAGE = """subcommand:
  decode.py ingest --checkpoint DIR --memory MEMDIR --file FILE
                        ingest a UTF-8 file into the memory, without decoding
                        (decode.py ingest --help)"""


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per turn at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=40, help="0 samples from the full distribution")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus: the most likely ids of this mass; 1: all"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed in [0, 2**32) (turn i uses seed + i)"
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["ingest"]:
        p = argparse.ArgumentParser(
            prog="decode.py ingest",
            description="Ingests a UTF-8 text file into a memory directory (one document).",
            formatter_class=HelpFormatter,
        )
        p.add_argument("--checkpoint", required=True, help="a MegaContext training workdir")
        p.add_argument("--memory", required=True, help="memory directory (created if new)")
        p.add_argument("--file", required=True, help="UTF-8 text to ingest (one document)")
        args = p.parse_args(argv[1:])
        args.command = "ingest"
        return args
    p = argparse.ArgumentParser(
        prog="decode.py", description=__doc__, epilog=INGEST_USAGE, formatter_class=HelpFormatter
    )
    p.add_argument(
        "--checkpoint", required=True, help="a training workdir, or a Hugging Face directory"
    )
    p.add_argument("--memory", help="memory directory: ingest, refocus and decode over it")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    source.add_argument(
        "--interactive", action="store_true", help="turn by turn from stdin (needs --memory)"
    )
    _sampling_args(p)
    args = p.parse_args(argv)
    args.command = "decode"
    if args.memory is None and args.interactive:
        p.error("--interactive needs --memory")
    if args.memory is None and args.prompt is None and args.prompt_file is None:
        p.error("give --prompt or --prompt-file (or --memory to continue a memory)")
    return args


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 file's text; ValueError (one line) if it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (bad byte at {e.start})") from None


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt text, or None when continuing a memory without one."""
    if args.prompt_file is not None:
        text = read_text(args.prompt_file, "prompt file")
    elif args.prompt is not None:
        text = args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the prompt holds bytes that are not UTF-8 (at {e.start})") from None
    else:
        return None
    if not text:
        raise ValueError("the prompt is empty")
    return text


def _sampling(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }


def _write(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _log(text: str) -> None:
    print(text, file=sys.stderr)


def _ingest(session, text: str, *, new_document: bool = False) -> None:
    """``session.ingest_text`` with a progress bar on stderr when the text is long."""
    from tqdm import tqdm

    from megacontext_jax.memory.tree import APPEND_PIECE

    ids = session.encode(text, new_document=new_document)
    if len(ids) <= APPEND_PIECE:
        session.ingest_ids(ids)
        return
    with tqdm(total=len(ids), unit="tok", unit_scale=True, desc="ingest", file=sys.stderr) as bar:
        session.ingest_ids(ids, bar.update)


def _with_memory(model, args: argparse.Namespace, prompt: str | None) -> None:
    with model.session(args.memory, log=_log) as session:
        try:
            if args.interactive:
                _log(f"memory {args.memory}: {session.num_tokens} tokens. Empty line or EOF ends.")
                for turn, line in enumerate(_lines()):
                    _ingest(session, line + "\n")
                    _write(session.stream(seed=args.seed + turn, **_sampling(args)))
            else:
                if prompt is not None:
                    sys.stdout.write(prompt)
                    _ingest(session, prompt)
                _write(session.stream(seed=args.seed, **_sampling(args)))
        except KeyboardInterrupt:
            _log(f"memory {args.memory}: {session.num_tokens} tokens")
            raise
        # Not after an error: its one line says what happened, and the count could include
        # tokens that a failed commit left out of the memory.
        _log(f"memory {args.memory}: {session.num_tokens} tokens")


def _lines():
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")


def _ingest_file(model, args: argparse.Namespace) -> None:
    text = read_text(args.file, "file")
    with model.session(args.memory, telemetry=False, log=_log) as session:
        start, before = time.perf_counter(), session.num_tokens

        def tally() -> None:
            seconds = time.perf_counter() - start
            added = session.num_tokens - before
            _log(
                f"memory {args.memory}: {session.num_tokens} tokens (+{added} in {seconds:.1f} s, "
                f"{added / max(seconds, 1e-9):,.0f} tokens/s)"
            )

        try:
            _ingest(session, text, new_document=True)
        except KeyboardInterrupt:
            tally()
            raise
        tally()  # not after an error, as in _with_memory


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from megacontext_jax.runtime.sampling import check_sampling

    if args.command == "decode":
        try:
            check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        except ValueError as e:
            print(f"error: --{str(e).replace('_', '-')}", file=sys.stderr)
            return 2
    import megacontext_jax as mcj

    try:
        prompt = read_prompt(args) if args.command == "decode" else None
        model = mcj.load(args.checkpoint)
        if args.command == "ingest":
            _ingest_file(model, args)
        elif args.memory is None:
            sys.stdout.write(prompt)
            _write(model.stream(prompt, seed=args.seed, **_sampling(args)))
        else:
            _with_memory(model, args, prompt)
    except (mcj.CheckpointError, mcj.TreeError, mcj.SessionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the memory keeps everything committed so far", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The ``megacontext-decode`` console entry point."""
    sys.exit(main(sys.argv[1:]))
