"""Errors shared across layers: ``ConfigError`` (a config field, one line; ``require`` and
``positive`` raise it) and the one line of an error from a library below us (Orbax,
TensorStore), for our own messages."""

from typing import Any

Group = Any  # an ml_collections.ConfigDict group, read by attribute


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, without the spec TensorStore may append (a page
    of JSON); its type's name for an empty message."""
    text = str(error).strip()
    return text.splitlines()[0].split(" [tensorstore_spec=")[0] if text else type(error).__name__


class ConfigError(ValueError):
    """A config problem, reported as one line that names the field."""


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


def positive(group: Group, prefix: str, *names: str) -> None:
    for name in names:
        value = group[name]
        require(value > 0, f"{prefix}.{name}", f"must be positive, got {value}")
