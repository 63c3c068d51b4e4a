"""
Time-limited TURN credentials in the format of coturn's REST API (its
``use-auth-secret``): the user name is ``EXPIRY:UID`` (EXPIRY in Unix
seconds), the password the base64 of HMAC-SHA1 of the user name, keyed with
the secret the TURN server shares. Peers behind strict NATs get them with
the page, or at ``GET /ice-servers``; the secret never leaves the server,
and nothing here is logged.
"""

import base64
import hashlib
import hmac
import secrets

#: Seconds credentials stay valid by default.
DEFAULT_TTL = 24 * 3600


class TurnConfigError(Exception):
    """The TURN secret cannot be used."""


def read_secret(path):
    """:returns: the shared secret in ``path`` (surrounding whitespace dropped), as bytes."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise TurnConfigError(f"--turn-secret: cannot read {path}: {e.strerror}")
    if not secret:
        raise TurnConfigError(f"--turn-secret: {path} is empty")
    return secret


def credentials(secret, uid, expiry):
    """:returns: ``(username, password)`` valid until ``expiry`` (Unix seconds)."""
    username = f"{int(expiry)}:{uid}"
    digest = hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


class TurnCredentials:
    """
    Hands out ``RTCIceServer`` entries for the TURN servers, with fresh
    credentials.

    :param secret: the shared secret (bytes).
    :param uris: the TURN URIs (``turn:host:port``, ``turns:...``).
    :param clock: an ``IReactorTime`` (its ``seconds()`` is Unix time).
    :param ttl: seconds the credentials stay valid.
    """

    def __init__(self, secret, uris, clock, ttl=DEFAULT_TTL):
        self._secret = secret
        self._uris = list(uris)
        self._clock = clock
        self._ttl = ttl

    def ice_servers(self, uid=None):
        """
        :param uid: who the credentials are for (a random name when None).
        :returns: a list with one ``RTCIceServer`` dictionary.
        """
        if uid is None:
            uid = "anonymous-" + secrets.token_hex(4)
        username, password = credentials(self._secret, uid, self._clock.seconds() + self._ttl)
        return [{"urls": list(self._uris), "username": username, "credential": password}]
