"""Decodes from a trained checkpoint, streaming text; with --memory, over a persistent MegaContext.

python decode.py --checkpoint runs/tiny --prompt "def fibonacci(n):"
python decode.py --checkpoint runs/tiny --memory mem/ --prompt-file prompt.txt --max-new-tokens 400
python decode.py --checkpoint runs/tiny --memory mem/ --interactive
python decode.py ingest --checkpoint runs/tiny --memory mem/ --file big.txt

Without --memory the base model samples from the prompt alone (a plain LM, its context capped at
the training length). With --memory the prompt is ingested into the tree at MEMDIR (created if new),
the working context is assembled and refocused every ``mc.refocus_every`` tokens, and the decoded
tokens join the memory too: running again with the same MEMDIR continues it. Telemetry (one JSONL
record per refocus and a PNG of the level-of-detail map) goes to MEMDIR/telemetry.
"""

import argparse
import sys
from pathlib import Path

from megacontext_jax.checkpoint import CheckpointError
from megacontext_jax.tree_storage import TreeError


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=40, help="0 samples from the full distribution")
    p.add_argument("--seed", type=int, default=0)


def _parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["ingest"]:
        p = argparse.ArgumentParser(
            prog="decode.py ingest", description="Ingests a text file into a memory directory."
        )
        p.add_argument("--checkpoint", required=True, help="a MegaContext training workdir")
        p.add_argument("--memory", required=True, help="memory directory (created if new)")
        p.add_argument("--file", required=True, help="UTF-8 text to ingest (one document)")
        args = p.parse_args(argv[1:])
        args.command = "ingest"
        return args
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a training workdir (holds config.json)")
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
    if args.max_new_tokens < 0:
        p.error("--max-new-tokens must be >= 0")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k < 0:
        p.error("--top-k must be >= 0")
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


def _stream(tokens, tokenizer) -> None:
    feed = tokenizer.stream_decoder()
    for token in tokens:
        sys.stdout.write(feed(token))
        sys.stdout.flush()


def _plain(args, prompt: str) -> None:
    from megacontext_jax.restore import load_model
    from megacontext_jax.sampling import generate
    from megacontext_jax.tokenizer import sampleable, tokenizer_for
    from megacontext_jax.train_step import base_model

    model, config = load_model(args.checkpoint)
    tokenizer = tokenizer_for(config.model)
    sys.stdout.write(prompt)
    tokens = generate(
        base_model(model),
        tokenizer.encode(prompt, bos=True),
        args.max_new_tokens,
        allowed=sampleable(config.model),
        capacity=config.data.seq_len,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    _stream(tokens, tokenizer)
    sys.stdout.write("\n")


def _ingest(session, tokens, bar: bool) -> None:
    """``session.ingest`` with a progress bar on stderr when ``bar``."""
    if not bar:
        session.ingest(tokens)
        return
    from tqdm import tqdm

    with tqdm(total=len(tokens), unit="tok", unit_scale=True, desc="ingest", file=sys.stderr) as t:
        session.ingest(tokens, t.update)


def _with_memory(args, prompt: str | None) -> None:
    from megacontext_jax.session import open_session
    from megacontext_jax.telemetry import Telemetry, plot_lod_map
    from megacontext_jax.tokenizer import tokenizer_for
    from megacontext_jax.tree import APPEND_PIECE

    telemetry = Telemetry(Path(args.memory) / "telemetry" / "refocus.jsonl")
    log = lambda text: print(text, file=sys.stderr)
    session = open_session(args.checkpoint, args.memory, telemetry=telemetry, log=log)
    tokenizer = tokenizer_for(session.config.model)
    try:

        def ingest(text: str) -> None:
            tokens = tokenizer.encode(text, bos=session.num_tokens == 0)
            _ingest(session, tokens, bar=len(tokens) > APPEND_PIECE)

        def decode(seed: int) -> None:
            tokens = session.generate(
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=seed,
                stop=(tokenizer.eos_id,),
            )
            _stream(tokens, tokenizer)
            sys.stdout.write("\n")

        if args.interactive:
            log(f"memory {args.memory}: {session.num_tokens} tokens. Empty line or EOF ends.")
            for turn, line in enumerate(_lines()):
                ingest(line + "\n")
                decode(args.seed + turn)
        else:
            if prompt is not None:
                sys.stdout.write(prompt)
                ingest(prompt)
            decode(args.seed)
    finally:
        session.close()
        telemetry.close()
        if telemetry.records:
            png = telemetry.path.with_name("lod_map.png")
            plot_lod_map(telemetry.records, session.k, png)
            log(f"memory {args.memory}: {session.num_tokens} tokens; telemetry {telemetry.path}")


def _lines():
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")


def _ingest_file(args) -> None:
    import time

    from megacontext_jax.session import open_session
    from megacontext_jax.tokenizer import tokenizer_for

    text = read_text(args.file, "file")
    log = lambda text: print(text, file=sys.stderr)
    session = open_session(args.checkpoint, args.memory, log=log)
    start, before = time.perf_counter(), session.num_tokens
    try:
        tokens = tokenizer_for(session.config.model).encode(text, bos=True)
        _ingest(session, tokens, bar=True)
    finally:
        session.close()
        seconds = time.perf_counter() - start
        added = session.num_tokens - before
        log(
            f"memory {args.memory}: {session.num_tokens} tokens (+{added} in {seconds:.1f} s, "
            f"{added / max(seconds, 1e-9):,.0f} tokens/s)"
        )


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from megacontext_jax.session import SessionError

    try:
        if args.command == "ingest":
            _ingest_file(args)
        else:
            prompt = read_prompt(args)
            if args.memory is None:
                _plain(args, prompt)
            else:
                _with_memory(args, prompt)
    except (CheckpointError, TreeError, SessionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the memory keeps everything committed so far", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
