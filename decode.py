"""Samples a continuation from a trained checkpoint, streaming text as it is generated.

python decode.py --checkpoint runs/tiny --prompt "def fibonacci(n):"
python decode.py --checkpoint runs/tiny --prompt-file prompt.txt --temperature 0 --max-new-tokens 400
"""

import argparse
import sys
from pathlib import Path

from megacontext_jax.checkpoint import CheckpointError


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a training workdir (holds config.json)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=40, help="0 samples from the full distribution")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error("--max-new-tokens must be >= 0")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k < 0:
        p.error("--top-k must be >= 0")
    return args


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"prompt file {path} is not UTF-8 text (bad byte at {e.start})"
            ) from None
    else:
        text = args.prompt
    if not text:
        raise ValueError("the prompt is empty")
    return text


def main(argv: list[str]) -> int:
    args = _parse(argv)
    try:
        prompt = read_prompt(args)
        from megacontext_jax.restore import load_model

        model, config = load_model(args.checkpoint)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from megacontext_jax.sampling import generate
    from megacontext_jax.tokenizer import ByteTokenizer
    from megacontext_jax.train_step import base_model

    tokenizer = ByteTokenizer()
    feed = tokenizer.stream_decoder()
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for token in generate(
        base_model(model),
        tokenizer.encode(prompt, bos=True),
        args.max_new_tokens,
        capacity=config.data.seq_len,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    ):
        sys.stdout.write(feed(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
