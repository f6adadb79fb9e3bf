"""Config files and command-line overrides, into a validated config.

``python train.py --config configs/tiny.py --config.train.steps=200``: the file's ``get_config(arg)``
builds a ``ConfigDict`` (``configs/x.py:arg`` passes ``arg``), each ``--config.a.b=v`` override is
parsed to the type of the field it replaces, and ``config.validate`` checks every value before any
compute. Problems raise ``ConfigError`` with one line naming the field; a config file whose fields
differ from ``base_config()``'s (a misspelt name) is one too.
"""

import ast
import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import ml_collections

from megacontext_jax.config import base_config, leaves, validate
from megacontext_jax.errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parents[1]  # holds configs/ in a checkout


def config_module(path: str) -> ModuleType:
    """Imports the config file at ``path``: its ``get_config`` and, if it has them, ``VARIANTS``.

    A relative path that is not found here is looked up in the project's checkout, so the
    shipped ``configs/tiny.py`` works from any directory (the console entry points).
    """
    if not Path(path).is_file() and (PROJECT_DIR / path).is_file():
        path = str(PROJECT_DIR / path)
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Imports ``path[:arg]`` and returns its ``get_config(arg)`` (or ``get_config()``), locked."""
    path, _, arg = spec.partition(":")
    module = config_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    # A config file sets fields of an unlocked base_config(), where a misspelt name would quietly
    # become a new field that nothing reads.
    known, found = leaves(base_config()).keys(), leaves(config).keys()
    for key in sorted(found - known):
        try:
            _lookup_parent(base_config(), key)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if known - found:
        missing = min(known - found)
        raise ConfigError(f"{path}: config.{missing} is missing (start from base_config())")
    config.lock()
    return config


def _lookup_parent(config: ml_collections.ConfigDict, key: str):
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(parts[:depth])
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f" (did you mean '{'.'.join([*parts[:depth], close[0]])}'?)" if close else ""
            where = f" under '{prefix}'" if prefix else ""
            raise ConfigError(f"unknown config key '{key}': no field '{part}'{where}{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _parse_value(key: str, text: str, current):
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config.{key}: expected a boolean, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config.{key}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config.{key}: expected a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets ``config.<key>`` from its command-line text, typed like the field it replaces."""
    parent, leaf = _lookup_parent(config, key)
    if isinstance(parent[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a group of fields; override one of its fields instead")
    value = _parse_value(key, text, parent[leaf])
    try:
        parent[leaf] = value
    except TypeError as e:
        raise ConfigError(f"config.{key}: {e}") from None


def split_args(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Splits ``argv`` into the ``--config PATH[:ARG]`` spec (None if absent), the
    ``--config.key=value`` (or ``--config.key value``) overrides in order, and the other arguments.
    """
    spec, overrides, rest = None, [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            spec = arg.partition("=")[2] if "=" in arg else (args.pop(0) if args else None)
            if not spec:
                raise ConfigError("--config needs a path to a config file")
        elif arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if not args:
                    raise ConfigError(f"--config.{key} needs a value")
                value = args.pop(0)
            overrides.append((key, value))
        else:
            rest.append(arg)
    return spec, overrides, rest


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Loads ``--config PATH[:ARG]``, applies the ``--config.key=value`` overrides, validates.

    Returns the validated config and the arguments that were not config flags.
    """
    spec, overrides, rest = split_args(argv)
    if spec is None:
        raise ConfigError("missing --config PATH (for example --config configs/tiny.py)")
    config = load_config(spec)
    for key, value in overrides:
        apply_override(config, key, value)
    validate(config)
    return config, rest
