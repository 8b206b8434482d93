"""Triton's log settings on Python logging, and the text / JSON line formats."""

from __future__ import annotations

import io
import json
import logging

import pytest

from convoy.errors import InvalidInput, Unsupported
from convoy.logs import JsonFormatter, LogControl, TextFormatter


@pytest.fixture
def logger():
    """A private logger writing to a string, so the root logger is never touched."""
    named = logging.getLogger("convoy.tests.logs")
    named.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    named.addHandler(handler)
    yield named, handler, stream
    named.removeHandler(handler)
    named.propagate = True


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_start_level_maps_to_triton_settings(logger):
    named, handler, _ = logger
    control = LogControl("WARNING", "text", handlers=(handler,), logger=named)
    assert control.settings() == {
        "log_file": "",
        "log_info": False,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "text",
    }
    assert named.level == logging.WARNING


def test_verbose_level_turns_debug_on_and_switches_are_independent(logger):
    named, handler, stream = logger
    control = LogControl("INFO", "text", handlers=(handler,), logger=named)
    control.update({"log_verbose_level": 1, "log_warning": False})
    named.debug("debug line")
    named.info("info line")
    named.warning("warning line")
    named.error("error line")
    text = stream.getvalue()
    assert "debug line" in text and "info line" in text and "error line" in text
    assert "warning line" not in text


def test_everything_off_logs_nothing(logger):
    named, handler, stream = logger
    control = LogControl("INFO", "text", handlers=(handler,), logger=named)
    control.update({"log_info": False, "log_warning": False, "log_error": False})
    named.critical("nothing")
    assert stream.getvalue() == ""


def test_switching_to_json_reformats_the_handlers(logger):
    named, handler, stream = logger
    control = LogControl("INFO", "text", handlers=(handler,), logger=named)
    assert control.update({"log_format": "json"})["log_format"] == "json"
    named.info("model %s ready", "add_sub", extra={"request_id": "req-7"})
    (line,) = _lines(stream)
    entry = json.loads(line)
    assert entry["message"] == "model add_sub ready"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "convoy.tests.logs"
    assert entry["request_id"] == "req-7"
    assert entry["timestamp"].endswith("+00:00")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"log_info": 1}, "log_info"),
        ({"log_verbose_level": -1}, "log_verbose_level"),
        ({"log_verbose_level": True}, "log_verbose_level"),
        ({"log_format": "xml"}, "log_format"),
        ({"log_file": "/tmp/x.log"}, "log file location can not be updated"),
        ({"log_colour": True}, "log_colour"),
    ],
)
def test_bad_setting_is_rejected_naming_it_and_changes_nothing(logger, changes, named):
    _, handler, _ = logger
    control = LogControl("INFO", "text", handlers=(handler,), logger=logger[0])
    before = control.settings()
    with pytest.raises((InvalidInput, Unsupported), match=named):
        control.update({"log_warning": False, **changes})
    assert control.settings() == before


def test_json_error_line_carries_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), exc_info=__import__("sys").exc_info()
        )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed"
    assert "Traceback" in entry["traceback"] and "ValueError: boom" in entry["traceback"]


def test_text_line_names_the_request():
    record = logging.makeLogRecord(
        {"name": "convoy.http", "levelno": logging.INFO, "levelname": "INFO", "msg": "done"}
    )
    record.request_id = "abc"
    line = TextFormatter().format(record)
    assert line.endswith("INFO convoy.http: done (request abc)")
