"""config.yaml, read so that no file can hang or crash the CLI.

A config file is small, UTF-8 text, and its YAML aliases expand to a small
document. Without these checks a 1 KB "billion laughs" file (nine anchors, each
nine aliases of the one before) took 36 s and 3 GB before a MemoryError, and a
file that is not UTF-8 printed a traceback. Aliases stay allowed (``<<: *defaults``
is useful), but the document they expand to is counted before it is built.

PyYAML is imported only when a file is parsed: ``dcf function call`` reads
config.yaml for its gateway address only when it names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 20
"""The largest config file read."""
MAX_NODES = 100_000
"""The most values (scalars, lists, maps) a document may expand to through its aliases."""


class YamlError(ValueError):
    """The file cannot be used; the message names it and says why, in one line."""


def read_text(path: Path) -> str:
    """The file's text, or YamlError if it is too large or not UTF-8 (OSError as raised)."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YamlError(f"{path}: {size} bytes, larger than the {MAX_BYTES} bytes a config may be")
    data = path.read_bytes()[: MAX_BYTES + 1]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def load(path: Path) -> Any:
    """Parse a YAML file within the limits above, or raise YamlError (OSError as raised)."""
    return loads(read_text(path), path)


def loads(text: str, source: Path | str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    except _TooLarge as exc:
        raise YamlError(f"{source}: {exc}") from None
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply") from None


class _TooLarge(Exception):
    pass


_LOADER: Any = None


def _loader() -> Any:
    global _LOADER
    if _LOADER is None:
        import yaml

        class Loader(yaml.SafeLoader):
            def get_single_node(self) -> Any:
                node = super().get_single_node()
                if node is not None:
                    _check(node, {}, set())
                return node

        _LOADER = Loader
    return _LOADER


def _check(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values ``node`` stands for once every alias in it is expanded."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _TooLarge("a YAML alias refers to a value that contains it")
    open_nodes.add(key)
    value = node.value
    total = 1
    if isinstance(value, list):
        for item in value:
            if isinstance(item, tuple):  # a mapping's (key, value)
                total += _check(item[0], sizes, open_nodes) + _check(item[1], sizes, open_nodes)
            else:
                total += _check(item, sizes, open_nodes)
            if total > MAX_NODES:
                raise _TooLarge(
                    f"its YAML aliases expand to more than {MAX_NODES} values (an alias bomb?)"
                )
    open_nodes.discard(key)
    sizes[key] = total
    return total
