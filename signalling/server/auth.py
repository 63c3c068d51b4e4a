"""
Who may connect: HMAC-SHA256 tokens (JSON Web Tokens, ``HS256``, checked with
PyJWT) signed with a secret the server shares with whoever mints them
(``signalling-token``).

A token comes as ``?token=`` on the WebSocket URL or as ``Authorization:
Bearer``; without a valid one the handshake is refused with 401 before any
WebSocket traffic. Its claims say what the connection may do:

- ``exp`` (required): when it expires;
- ``sub``: the one uid it may register with ``HELLO``;
- ``roles``: the roles of the JSON dialect it may take;
- ``rooms``: the rooms it may join; ``calls``: the uids it may call.

A claim left out allows anything of its kind. A token that names only JSON
roles (a viewer's, say) is for the JSON dialect alone: on a port or path
pinned to the examples' protocol its handshake is refused with 403, and on
an ``auto`` port a ``HELLO`` with it is refused, so that it cannot register
any uid it likes. (A token naming a uid serves both: the call page and its
stream viewer share one.) The secrets file holds one
secret a line: every one is accepted (two during a rotation), the first
signs; SIGHUP reloads it. Tokens are never logged.
"""

import time

import jwt

_ALGORITHMS = ["HS256"]


class AuthConfigError(Exception):
    """The secrets file cannot be used."""


class TokenRefused(Exception):
    """
    A token that does not let the connection in.

    :ivar reason: ``missing``, ``invalid`` or ``expired`` (a metrics label).
    """

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def read_secrets(path):
    """:returns: the secrets in ``path``, one a line (bytes), the signing one first."""
    try:
        with open(path, "rb") as f:
            secrets = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise AuthConfigError(f"--auth-secret: cannot read {path}: {e.strerror}")
    if not secrets:
        raise AuthConfigError(f"--auth-secret: {path} holds no secret")
    for secret in secrets:
        if len(secret) < 32:
            raise AuthConfigError(
                f"--auth-secret: {path}: a secret must be at least 32 characters"
            )
    return secrets


def mint(secret, ttl, uid=None, roles=None, rooms=None, calls=None, now=None):
    """:returns: a token signed with ``secret``, valid for ``ttl`` seconds."""
    claims = {"exp": int((time.time() if now is None else now) + ttl)}
    if uid is not None:
        claims["sub"] = uid
    for name, value in (("roles", roles), ("rooms", rooms), ("calls", calls)):
        if value is not None:
            claims[name] = list(value)
    return jwt.encode(claims, secret, algorithm=_ALGORITHMS[0])


class Grant:
    """What a valid token allows."""

    __slots__ = ("uid", "roles", "rooms", "calls")

    def __init__(self, claims):
        self.uid = claims.get("sub")
        self.roles = _names(claims.get("roles"))
        self.rooms = _names(claims.get("rooms"))
        self.calls = _names(claims.get("calls"))

    def allows_dialect(self, dialect):
        """:returns: whether the token is for ``dialect`` (``examples`` or ``json``)."""
        if dialect == "json":
            return True
        # Roles alone: a token for the JSON dialect only.
        return self.roles is None or any(
            claim is not None for claim in (self.uid, self.rooms, self.calls)
        )

    def allows_uid(self, uid):
        return self.uid is None or uid == self.uid

    def allows_roles(self, roles):
        return self.roles is None or all(role in self.roles for role in roles)

    def allows_room(self, room_id):
        return self.rooms is None or room_id in self.rooms

    def allows_call(self, uid):
        return self.calls is None or uid in self.calls


def _names(value):
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenRefused("invalid")
    return frozenset(value)


class TokenKeys:
    """
    The secrets tokens are checked with, from ``path``, reloaded with
    :meth:`reload`.
    """

    def __init__(self, path):
        self._path = path
        self._secrets = read_secrets(path)

    def reload(self):
        """Read the secrets again; a file that cannot be used leaves the old ones."""
        self._secrets = read_secrets(self._path)

    def check(self, token):
        """
        :returns: the :class:`Grant` of a token valid under any secret.
        :raises TokenRefused: no token, a bad one, or an expired one.
        """
        if not token:
            raise TokenRefused("missing")
        expired = False
        for secret in self._secrets:
            try:
                claims = jwt.decode(
                    token, secret, algorithms=_ALGORITHMS, options={"require": ["exp"]}
                )
            except jwt.ExpiredSignatureError:
                expired = True
                continue
            except jwt.InvalidTokenError:
                continue
            return Grant(claims)
        raise TokenRefused("expired" if expired else "invalid")


def token_of(request):
    """:returns: the token of an Autobahn ``ConnectionRequest``: ``?token=`` or a Bearer header."""
    values = request.params.get("token")
    if values:
        return values[0]
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return None
