"""JSON objects out of a byte stream of concatenated objects (a Kubernetes
watch body), fed in whatever pieces the network delivers.

Each byte is scanned once to find where an object ends (regexes skip the runs
between the characters that matter: quotes, backslashes, brackets), and only
a complete object is parsed: the cost stays linear in the bytes however a
server cuts them, and an object larger than the limit fails as soon as the
bytes held pass it.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SPACE = re.compile(rb"[ \t\r\n]*")
_PLAIN = re.compile(rb'[^"{}\[\]]+')  # outside strings: nothing that opens, closes or quotes
_IN_STRING = re.compile(rb'[^"\\]+')  # inside a string: nothing that ends it or escapes

_OPEN_BRACE, _OPEN_BRACKET, _QUOTE, _BACKSLASH = 0x7B, 0x5B, 0x22, 0x5C


class JsonObjectStream:
    """feed(bytes) -> the objects completed by them. ValueError when the
    stream holds something other than JSON objects, invalid JSON, or an
    object over `max_object_bytes`; the stream is unusable after that."""

    def __init__(self, max_object_bytes: int):
        self.max_object_bytes = max_object_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already scanned
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf
        buf += data
        out: list[Any] = []
        start, i, n = 0, self._scanned, len(buf)  # start: where the current object begins
        while i < n:
            if self._depth == 0:
                i = _SPACE.match(buf, i).end()
                start = i
                if i == n:
                    break
                if buf[i] != _OPEN_BRACE:
                    raise ValueError("the stream holds something other than a JSON object")
                self._depth, i = 1, i + 1
            elif self._escaped:
                self._escaped, i = False, i + 1
            elif self._in_string:
                m = _IN_STRING.match(buf, i)
                if m:
                    i = m.end()
                    continue
                if buf[i] == _BACKSLASH:
                    self._escaped = True
                else:
                    self._in_string = False  # the closing quote
                i += 1
            else:
                m = _PLAIN.match(buf, i)
                if m:
                    i = m.end()
                    continue
                c = buf[i]
                i += 1
                if c == _QUOTE:
                    self._in_string = True
                elif c in (_OPEN_BRACE, _OPEN_BRACKET):
                    self._depth += 1
                else:  # a closing bracket: json.loads checks that it matches
                    self._depth -= 1
                    if self._depth == 0:
                        out.append(json.loads(bytes(buf[start:i])))
                        start = i
        del buf[:start]  # once per feed: what is left is the current object's beginning
        self._scanned = i - start
        if len(buf) > self.max_object_bytes:
            raise ValueError(f"a JSON object larger than {self.max_object_bytes} bytes")
        return out
