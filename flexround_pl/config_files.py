"""Check the YAML files given with ``--config`` before jsonargparse reads them.

jsonargparse reports an empty, scalar or binary file as ``Unexpected config:``
without the file's name, and silently replaces a section written as a scalar
(``quant: 3``) by its defaults. These checks name the file and the section.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import yaml

#: Config sections that are mappings of keys. A class-typed section (``model.source``,
#: ``data``) may also be a bare class path string.
SECTIONS = (
    "trainer", "model", "data", "model.quant", "model.quant.weight", "model.quant.activation",
    "model.reconstruction", "model.source",
)
CLASS_SECTIONS = ("model.source", "data")
SUBCOMMANDS = ("fit", "validate", "test")


def config_paths(argv: Sequence[str]) -> list[str]:
    """The values of every ``--config X`` / ``--config=X`` in ``argv``."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.partition("=")[2])
    return paths


def _lookup(tree: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def check_config_file(path: str) -> None:
    """``ValueError`` naming ``path`` if it is not a YAML mapping of config sections.

    A missing path or a directory is left to jsonargparse, whose messages name it.
    """
    if not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config file {path!r} is not a text file (binary?); pass a YAML config") from None
    except OSError as e:
        raise ValueError(f"config file {path!r} cannot be read ({e.strerror or e})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if tree is None:
        raise ValueError(f"config file {path!r} is empty; write its sections (trainer:, model:, data:)")
    if not isinstance(tree, dict):
        raise ValueError(
            f"config file {path!r} is not a YAML config: it holds a {type(tree).__name__}, not sections "
            "(trainer:, model:, data:)"
        )
    for root in ("",) + tuple(f"{s}." for s in SUBCOMMANDS):  # ``fit: {trainer: ...}`` nests the sections
        for section in SECTIONS:
            found, value = _lookup(tree, root + section)
            if not found or value is None or isinstance(value, dict):
                continue
            if section in CLASS_SECTIONS and isinstance(value, str):
                continue
            raise ValueError(
                f"config file {path!r}: {root + section} must be a section (keys indented under it), "
                f"got {value!r}; remove the line to use the defaults"
            )


def check_config_files(argv: Optional[Sequence[str]]) -> None:
    for path in config_paths(list(argv) if argv is not None else []):
        check_config_file(os.path.expanduser(path))


__all__ = ["check_config_file", "check_config_files", "config_paths"]
