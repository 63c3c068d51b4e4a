"""
Client text echoed into the server's log lines and error replies, bounded:
whatever a client sends (a uid, a room id, a peer or session id, a role
list), no more than :data:`ECHO_LIMIT` characters of it are written back or
logged, and control characters are written as ``\\xNN``, so that a request
costs the log about its own line, not its size, and cannot forge lines.
Every dialect formats client values through :func:`quote` or :func:`clip`.
"""

import re

#: Most characters of one client value that are echoed (a longest uid and one more).
ECHO_LIMIT = 257

#: Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escape_control(match):
    return f"\\x{ord(match.group()):02x}"


def clip(value, limit=ECHO_LIMIT):
    """
    :param value: text a client sent (anything else is turned into text).
    :returns: ``value`` cut to ``limit`` characters (``...`` marks a cut),
        with control characters written as ``\\xNN``.
    """
    if not isinstance(value, str):
        value = str(value)
    if len(value) > limit:
        value = value[:limit] + "..."
    return _CONTROL.sub(_escape_control, value)


def quote(value, limit=ECHO_LIMIT):
    """:returns: :func:`clip` of ``value`` in single quotes."""
    return "'" + clip(value, limit) + "'"
