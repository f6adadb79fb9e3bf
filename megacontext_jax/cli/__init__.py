"""The command-line entry points: ``train.py`` / ``megacontext-train`` and ``decode.py`` /
``megacontext-decode`` (``python -m megacontext_jax.evaluation``, ``.sweep`` and ``.tree`` keep their
own ``main``). Each is a thin layer over the library's Python API."""

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
