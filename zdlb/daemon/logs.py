"""Logging set-up for the daemon: one line per event on stderr, as text or JSON.

Log calls elsewhere pass lazy ``%s`` arguments and put the event name first, then
``key=value`` context; the JSON formatter keeps that message and adds time, level and logger.
"""

from __future__ import annotations

import json
import logging
import sys

from zdlb.config.model import LogFormat

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one); a worker
    process's lines also carry ``worker``."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(
    level: str, log_format: LogFormat, *, access_log: bool = True, worker: int | None = None
) -> None:
    """Route every zdlb logger to stderr at ``level`` ("debug", "info", ...).

    ``worker``: this is worker process number ``worker``; every line says so (text: a trailing
    ``worker=N``, after the event's own context), so its lines can be told from its siblings'.
    """
    handler = logging.StreamHandler(sys.stderr)
    match log_format:
        case LogFormat.JSON:
            handler.setFormatter(JsonFormatter(worker))
        case LogFormat.TEXT:
            suffix = "" if worker is None else f" worker={worker}"
            handler.setFormatter(logging.Formatter(_TEXT_FORMAT + suffix))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The access log is its own logger so it can be silenced without hiding events.
    logging.getLogger("zdlb.access").disabled = not access_log
