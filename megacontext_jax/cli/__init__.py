"""The command-line entry points: ``train.py`` / ``megacontext-train`` and ``decode.py`` /
``megacontext-decode`` (``python -m megacontext_jax.evaluation``, ``.sweep`` and ``.memory.tree``
keep their own ``main``). Each is a thin layer over the library's Python API. Here: what their parsers
share (no JAX: ``--help`` answers at once)."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (their examples keep their lines), and every option's
    default in its help, except the ones that say nothing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        says_nothing = any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if says_nothing or "%(default)" in text or "(default" in text:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """Refuses a bad argument with one line, ``error: ...`` (exit status 2); ``--help`` has the
    usage that argparse would print above it."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def at_least(least: int):
    """An argparse type: an integer >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
        return value

    return parse


def history_lengths(text: str) -> list[int]:
    """An argparse type: distinct multiples of W >= 1, separated by commas (a repeated one
    would overwrite its own results)."""
    try:
        lengths = [at_least(1)(m) for m in text.split(",")]
    except argparse.ArgumentTypeError:
        lengths = []
    if not lengths or len(set(lengths)) < len(lengths):
        raise argparse.ArgumentTypeError(
            f"must be distinct integers >= 1 separated by commas, got {text!r}"
        )
    return lengths
