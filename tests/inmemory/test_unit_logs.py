"""
pgws's log observer: one JSON object a line (time, level, namespace, system, text, traceback),
only the text of an event and never its other fields, the level filter, and both changed at once.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from pgws._logs import LogOutput, json_line

EVENT_TIME = 1_800_000_000.25


def logged(output: LogOutput) -> tuple[Logger, LogPublisher]:
    publisher = LogPublisher(output)
    return Logger(namespace="pgws.test", observer=publisher), publisher


def test_json_line_is_one_object_with_time_level_namespace_system_and_text():
    line = json_line({"log_format": "WebSocket from {peer} open", "peer": "tcp4:1.2.3.4:5",
                      "log_level": LogLevel.warn, "log_namespace": "pgws._protocol",
                      "log_system": "HTTPChannel,1,1.2.3.4", "log_time": EVENT_TIME})
    assert line is not None and line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "2027-01-15T08:00:00.250000Z", "level": "warn", "namespace": "pgws._protocol",
        "system": "HTTPChannel,1,1.2.3.4", "text": "WebSocket from tcp4:1.2.3.4:5 open"}


def test_json_line_never_writes_fields_the_message_leaves_out():
    secret_field = "eyJhbGciOiJIUzI1NiJ9.eyJtb2RlIjoiciJ9.signature"
    line = json_line({"log_format": "refused", "request_uri": "/chat/" + secret_field,
                      "log_level": LogLevel.info, "log_namespace": "x", "log_time": EVENT_TIME})
    assert line is not None and secret_field not in line
    assert set(json.loads(line)) == {"time", "level", "namespace", "system", "text"}


def test_json_line_is_one_line_of_ascii_whatever_the_text():
    line = json_line({"log_format": "{x}", "x": "two\nlines, \u00e9 and \ud800 and \x1e",
                      "log_level": LogLevel.info, "log_namespace": "x", "log_time": EVENT_TIME})
    assert line is not None and line.isascii() and line.count("\n") == 1
    assert json.loads(line)["text"] == "two\nlines, \u00e9 and \ud800 and \x1e"


def test_an_event_without_a_message_writes_nothing():
    assert json_line({"log_level": LogLevel.info, "log_namespace": "x"}) is None


def test_a_failure_is_written_with_its_traceback():
    out = io.StringIO()
    log, _ = logged(LogOutput(out, "json"))
    log.failure("the relay failed", Failure(ZeroDivisionError("division by zero")))
    record = json.loads(out.getvalue())
    assert record["level"] == "critical" and record["text"] == "the relay failed"
    assert "ZeroDivisionError" in record["traceback"]


def test_text_format_is_twistds_line():
    out = io.StringIO()
    log, _ = logged(LogOutput(out, "text"))
    log.info("hello {who}", who="world")
    assert out.getvalue().endswith(" [pgws.test#info] hello world\n")


def test_log_level_drops_less_severe_events():
    out = io.StringIO()
    log, _ = logged(LogOutput(out, "json", "warn"))
    log.debug("debug")
    log.info("info")
    log.warn("warn")
    log.error("error")
    assert [json.loads(line)["text"] for line in out.getvalue().splitlines()] == ["warn", "error"]


def test_debug_level_writes_debug_events():
    out = io.StringIO()
    log, _ = logged(LogOutput(out, "text", "debug"))
    log.debug("debug")
    assert "debug" in out.getvalue()


def test_apply_changes_format_and_level_from_the_next_event():
    out = io.StringIO()
    output = LogOutput(out)
    log, _ = logged(output)
    log.info("as text")
    output.apply("json", "error")
    log.warn("dropped")
    log.error("as json")
    first, second = out.getvalue().splitlines()
    assert first.endswith("as text") and json.loads(second)["text"] == "as json"
    assert output.settings == ("json", "error")


def test_events_without_a_level_or_namespace_are_kept():
    out = io.StringIO()
    LogOutput(out, "json")({"log_format": "legacy", "log_time": EVENT_TIME})
    record = json.loads(out.getvalue())
    assert (record["level"], record["namespace"], record["text"]) == ("info", "-", "legacy")
