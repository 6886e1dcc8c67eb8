"""YAML from someone else, read within limits.

yaml's safe loader builds no objects from tags, but it has no bounds: its
composer recurses once per nesting level (a 10,000-deep document ends in a
RecursionError), an alias is expanded wherever it is used (a "billion
laughs" document is a few hundred bytes), a key given twice silently keeps
the last value, and its scalar constructors let int(), datetime() and dict
lookups raise on the document's text. parse_yaml() bounds all of these and
raises YamlError (a yaml.YAMLError, with line and column) for each.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode

# A real configuration is a few KiB, 3 levels and a few hundred values; a
# SIGHUP parses it inside the daemon, so the worst document these let through
# must parse in milliseconds (tests/test_config_fuzz.py measures it).
MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_VALUES = 1024

YamlError = yaml.YAMLError


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """yaml's safe loader, bounded. The composer recurses once per level, so
    depth is checked there, long before Python's recursion limit; aliases
    count as the values they stand for, so a "billion laughs" document stops
    at MAX_VALUES; a key given twice is an error, not a silent
    override (a merge key `<<` may still be overridden, as YAML intends)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._values = 0
        self._anchor_values: dict[str, int] = {}

    def _count(self, n: int, mark: Any) -> None:
        self._values += n
        if self._values > MAX_VALUES:
            raise ComposerError(None, None, f"more than {MAX_VALUES} values (aliases count as what "
                                "they repeat)", mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._anchor_values:
                raise ComposerError(None, None, f"alias *{event.anchor} is inside its own anchor (a cycle)",
                                    event.start_mark)
            node = super().compose_node(parent, index)
            self._count(self._anchor_values.get(event.anchor, 1), event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        before = self._values
        self._count(1, event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._anchor_values[event.anchor] = self._values - before
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise ConstructorError("while reading a mapping", node.start_mark,
                                               f"key {key_node.value!r} is given twice", key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as e:
            # yaml's scalar constructors hand the file's text to int(),
            # datetime() or a dict lookup (`!!int abc`, `!!bool x`, a month
            # 13, a 5,000-digit number) and let their exceptions through.
            raise ConstructorError(None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value "
                                   f"{_cut(repr(getattr(node, 'value', None)), 60)}: {_cut(repr(e), 100)}",
                                   node.start_mark) from None


def parse_yaml(text: str) -> Any:
    """One YAML document, read by the bounded safe loader (the caller checks
    the size, MAX_BYTES, before it decodes). Raises YamlError."""
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass: no object-building tags


class FileError(Exception):
    """What is wrong with a YAML file, worded to follow its name: the caller
    writes f"{what} {path}{error}" in its own error class."""


def read_yaml_file(path: str, max_bytes: int) -> Any:
    """The one YAML document of a regular file of at most `max_bytes`, UTF-8,
    read by parse_yaml(). Raises FileError."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise FileError(" is not a regular file")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise FileError(f": {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the path
        raise FileError(f": {e}") from None
    if len(raw) > max_bytes:
        raise FileError(f" is larger than {max_bytes // 1024} KiB")
    try:
        return parse_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FileError(f" is not UTF-8 text (byte {e.start})") from None
    except YamlError as e:
        raise FileError(f" is not valid YAML: {e}") from None
