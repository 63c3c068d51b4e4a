"""
The server's log observers: structured logs, one JSON object per line, for
journald and log shippers; and twistd's own text lines, formatted faster.

Each JSON line carries the time, the level, the namespace, the rendered
message, the event's own fields (``uid``, ``peer_addr``, ``room_id``,
``code``, ...) and, for a failure, its traceback.

The text lines are those of twistd's default observer
(``twisted.logger.formatEventAsClassicLogText``), character for character;
Twisted builds each through ``string.Formatter`` and three conversions of
its time stamp, about 30 µs a line, several times what the server spends
on a connection's HELLO. :func:`classic_text` makes the same line with
``str.format_map`` and the time stamp of the second once, for the events
that allow it (a format of plain field names, no failure), and leaves the
others to Twisted.
"""

import json
import math
import sys
from string import Formatter

from twisted.logger import FileLogObserver, formatEvent, formatEventAsClassicLogText, formatTime

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


#: Format strings already looked at: True when their fields are plain names
#: (no conversion, format spec, attribute, index or ``()`` call), which
#: ``str.format_map`` renders as Twisted's formatter does.
_PLAIN_FORMATS = {}
_FORMATS_KEPT = 1024
_parse = Formatter().parse


def _plain(format_string):
    plain = _PLAIN_FORMATS.get(format_string)
    if plain is None:
        try:
            plain = all(
                name is None or (name.isidentifier() and not spec and conversion is None)
                for _, name, spec, conversion in _parse(format_string)
            )
        except ValueError:
            plain = False
        if len(_PLAIN_FORMATS) >= _FORMATS_KEPT:
            _PLAIN_FORMATS.clear()
        _PLAIN_FORMATS[format_string] = plain
    return plain


#: The whole second the time stamp below is for, and its text plus a space.
_second = None
_stamp = ""


def classic_text(event):
    """
    :returns: what ``formatEventAsClassicLogText`` returns for ``event``
        (twistd's text line, its time stamp in twistd's format), made
        without ``string.Formatter`` when the event allows it.
    """
    global _second, _stamp
    format_string = event.get("log_format")
    if (
        format_string.__class__ is not str
        or "log_failure" in event
        or "log_flattened" in event
        or not _plain(format_string)
    ):
        return formatEventAsClassicLogText(event)
    try:
        text = format_string.format_map(event)
    except Exception:
        return formatEventAsClassicLogText(event)
    if not text:
        return None
    when = event.get("log_time")
    if when.__class__ is not float:
        return formatEventAsClassicLogText(event)
    second = int(when)
    if second != _second:
        fraction = when - second
        # The time stamp rounds to the microsecond: the last one of a
        # second may show the next.
        if fraction < 0 or fraction >= 0.999999:
            return formatEventAsClassicLogText(event)
        _stamp = formatTime(when) + " "
        _second = second
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = "{}#{}".format(event.get("log_namespace", "-"), "-" if level is None else level.name)
    elif system.__class__ is not str:
        return formatEventAsClassicLogText(event)
    return "".join((_stamp, "[", system, "] ", text)).replace("\n", "\n\t") + "\n"


def text_observer(out):
    """
    :param out: a text file.
    :returns: an ``ILogObserver`` writing twistd's text lines to ``out``,
        the same as ``twisted.logger.textFileLogObserver(out)``.
    """
    return FileLogObserver(out, classic_text)


def twistd_text_observer(config):
    """
    :param config: the server's parsed :class:`signalling.server.tap.Options`.
    :returns: the observer of :func:`text_observer` on standard output when
        twistd would log there itself with its text observer (``-n``
        without ``--logfile``, or ``--logfile -``; no ``--syslog``, no
        ``--logger``), else None: twistd's own observer (a log file, with
        its rotation; syslog; another runner than twistd).
    """
    twistd = getattr(config, "parent", None)
    if twistd is None or "nodaemon" not in twistd or "logfile" not in twistd:
        return None
    if twistd.get("syslog") or twistd.get("logger"):
        return None
    if not twistd["nodaemon"] or twistd["logfile"] not in (None, "", "-"):
        return None
    return text_observer(sys.stdout)
