"""
Structured logs: one JSON object per line, for journald and log shippers.

Each line carries the time, the level, the namespace, the rendered message,
the event's own fields (``uid``, ``peer_addr``, ``room_id``, ``code``, ...)
and, for a failure, its traceback.
"""

import json
import math
import sys

from twisted.logger import FileLogObserver, formatEvent

#: Keys of twisted.logger's own bookkeeping; not copied into the JSON object.
_INTERNAL = frozenset(
    {
        "log_logger",
        "log_source",
        "log_io",
        "log_trace",
        "log_flattened",
        "log_observer",
        "format",
        "message",
        "time",
        "system",
        "isError",
        "failure",
        "why",
        "log_text",
    }
)


def _field(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_field(v) for v in value]
    return str(value)


def event_as_record(event):
    """
    :returns: the JSON-serialisable dict for one log event.
    """
    record = {
        "time": _field(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL or key in record:
            continue
        record[key] = _field(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


def json_observer(out=None):
    """
    :param out: a text file; standard output when None.
    :returns: an ``ILogObserver`` writing one JSON object per line.
    """
    out = sys.stdout if out is None else out
    return FileLogObserver(
        out, lambda event: json.dumps(event_as_record(event), allow_nan=False) + "\n"
    )
