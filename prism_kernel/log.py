"""Structured log lines: one line per event, logfmt or JSON, on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO


def _logfmt_value(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' ="\\\n\t'):
        return json.dumps(s)
    return s


class EventLog:
    def __init__(self, fmt: str = "logfmt", stream: TextIO | None = None):
        self.fmt = fmt
        self.stream = stream or sys.stderr

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        now = time.time()  # one clock read: seconds and milliseconds must agree
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        record = {"ts": ts, "level": level, "event": event, **{k: v for k, v in fields.items() if v is not None}}
        if self.fmt == "json":
            line = json.dumps(record, default=str)
        else:
            line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in record.items())
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not stop the data path's writer

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warn(self, event: str, **fields: Any) -> None:
        self._emit("warn", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


class EventLogHandler(logging.Handler):
    """Routes `logging` records (the data-path modules use it) into the
    event log, so every line the daemon prints has the same structure."""

    def __init__(self, events: EventLog):
        super().__init__()
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        level = {logging.WARNING: "warn", logging.ERROR: "error", logging.CRITICAL: "error"}.get(record.levelno, "info")
        self.events._emit(level, "datapath", {"module": record.name.rsplit(".", 1)[-1], "msg": record.getMessage()})


def route_logging(events: EventLog) -> None:
    root = logging.getLogger("prism_kernel")
    root.handlers[:] = [EventLogHandler(events)]
    root.setLevel(logging.INFO)
    root.propagate = False
