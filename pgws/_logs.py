"""
pgws's log observer under twistd: C{log-format} (text, or one JSON object a line) and
C{log-level} (the least severe level written), both changed by a reload.

How it gets there: twistd builds its log observer only after C{makeService}, and before building
its own it asks the application for an C{ILogObserver} component (unless C{--logger} names one).
pgws's top service sets that component when twistd makes it a child of the application
(L{pgws._tap}), with an observer that writes where twistd would have written: standard output
with C{-n} and no C{--logfile} (or C{--logfile -}), else the log file (default C{twistd.log}),
rotated at 1 MB and on SIGUSR1 as twistd rotates its own.  With C{--syslog} or C{--logger}
twistd's observer stays, and these two settings do nothing.

A JSON line holds C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{system}, C{text} (what the
text format writes after the time and system) and, for an error with a traceback, C{traceback}.
Twisted's C{eventAsJSON} is not used: it writes every field of an event, and a field that the
message leaves out (a request, a header) could hold a token that the text never shows.  The JSON
is ASCII (C{ensure_ascii}), so one event is always one line.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python import logfile
from zope.interface import implementer

__all__ = ["LogOutput", "json_line", "text_line", "twistd_destination"]


def text_line(event: LogEvent) -> str | None:
    """twistd's own line: time, C{[system]}, the message, a traceback on the lines after."""
    return formatEventAsClassicLogText(event, lambda t: formatTime(t, timeFormatRFC3339))


def json_line(event: LogEvent) -> str | None:
    """One JSON object and a newline; None for an event with nothing to say."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if not text and failure is None:
        return None
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": None if when is None else
        datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "system": event.get("log_system", "-"),
        "text": text,
    }
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot be formatted must not lose the line
            record["traceback"] = "(the traceback could not be formatted)"
    return json.dumps(record, default=str) + "\n"


_FORMATS: dict[str, Callable[[LogEvent], str | None]] = {"text": text_line, "json": json_line}


@implementer(ILogObserver)
class LogOutput:
    """
    Writes the events at C{log-level} or above to C{out} in C{log-format}.  Events without a
    level (none of Twisted's) count as info.  Twisted's C{LogLevelFilterPredicate} is not used:
    it also drops every event without a namespace.
    """

    def __init__(self, out: IO[Any], log_format: str = "text", log_level: str = "info") -> None:
        self._file = FileLogObserver(out, self._line)
        self._formatter = _FORMATS["text"]
        self._least = LogLevel.info
        self.settings = ("text", "info")
        self.apply(log_format, log_level)

    def apply(self, log_format: str, log_level: str) -> None:
        """From the next event on (a reload)."""
        self._formatter = _FORMATS[log_format]
        self._least = LogLevel.levelWithName(log_level)
        self.settings = (log_format, log_level)

    def _line(self, event: LogEvent) -> str | None:
        return self._formatter(event)

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level", LogLevel.info) < self._least:
            return
        self._file(event)


def twistd_destination(options: Mapping[str, Any]) -> IO[Any] | None:
    """
    Where twistd would write its log, given its own options (the parent of pgws's); None
    where twistd's observer must stay (C{--syslog}, C{--logger}, or an error of its own to
    report, C{--logfile -} without C{-n}).
    """
    if options.get("syslog") or options.get("logger"):
        return None
    name = options.get("logfile") or ""
    nodaemon = options.get("nodaemon")
    if name == "-" or (not name and nodaemon):
        return sys.stdout if nodaemon else None
    out: IO[Any] = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):  # as twistd does: unless a handler is set already

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return out
