"""
Who may connect: HMAC-SHA256 tokens (JSON Web Tokens, ``HS256``, checked with
PyJWT) signed with a secret the server shares with whoever mints them
(``signalling-token``).

A token comes as ``?token=`` on the WebSocket URL or as ``Authorization:
Bearer``; without a valid one the handshake is refused with 401 before any
WebSocket traffic. Its claims say what the connection may do:

- ``exp`` (required): when it expires; the connection is closed then
  (4001, ``token expired``);
- ``iat``: when it was issued. A token that lives longer than the server's
  ``--max-token-lifetime`` (from ``iat``, or from now if it has none, or
  ``iat`` is ahead) is refused;
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
signs; SIGHUP reloads it, and connections whose token was signed with a
secret no longer there are closed (4001, ``token revoked``). Tokens are
never logged.
"""

import time

import jwt

_ALGORITHMS = ["HS256"]
#: Only the signature and the presence of ``exp`` are left to PyJWT: the
#: times are checked against the server's clock (see :meth:`TokenKeys.check`).
_DECODE_OPTIONS = {
    "require": ["exp"],
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
}
#: The close code of a connection whose token expired or was revoked: one of
#: the private range, so that a client can tell "get a new token and come
#: back" from every other close (1008 means the server will not have it).
CLOSE_TOKEN = 4001
TOKEN_EXPIRED = "token expired"
TOKEN_REVOKED = "token revoked"
#: The longest lifetime of a token by default, in seconds (a day).
DEFAULT_MAX_LIFETIME = 86400.0


class AuthConfigError(Exception):
    """The secrets file cannot be used."""


class TokenRefused(Exception):
    """
    A token that does not let the connection in.

    :ivar reason: ``missing``, ``invalid``, ``expired`` or ``lifetime``
        (it lives longer than the server allows): a metrics label.
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
    """:returns: a token signed with ``secret``, issued ``now`` and valid for ``ttl`` seconds."""
    now = time.time() if now is None else now
    claims = {"iat": int(now), "exp": int(now + ttl)}
    if uid is not None:
        claims["sub"] = uid
    for name, value in (("roles", roles), ("rooms", rooms), ("calls", calls)):
        if value is not None:
            claims[name] = list(value)
    return jwt.encode(claims, secret, algorithm=_ALGORITHMS[0])


class Grant:
    """
    What a valid token allows.

    :ivar expires: when the token expires (its ``exp``, in the server
        clock's seconds).
    :ivar secret: the secret that signed it (the connection is closed when
        a reload removes it).
    """

    __slots__ = ("uid", "roles", "rooms", "calls", "expires", "secret")

    def __init__(self, claims, secret=None):
        self.uid = claims.get("sub")
        self.roles = _names(claims.get("roles"))
        self.rooms = _names(claims.get("rooms"))
        self.calls = _names(claims.get("calls"))
        self.expires = claims.get("exp")
        self.secret = secret

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


def _is_time(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TokenKeys:
    """
    The secrets tokens are checked with, from ``path``, reloaded with
    :meth:`reload`.

    :param clock: the ``IReactorTime`` tokens' times are checked against
        (the server's, which also closes a connection when its token
        expires).
    :param max_lifetime: the longest a token may live, in seconds (from
        its ``iat``, or from when it is checked); 0: no limit.
    """

    def __init__(self, path, clock, max_lifetime=DEFAULT_MAX_LIFETIME):
        self._path = path
        self._secrets = read_secrets(path)
        self._clock = clock
        self.max_lifetime = max_lifetime

    def reload(self):
        """Read the secrets again; a file that cannot be used leaves the old ones."""
        self._secrets = read_secrets(self._path)

    def revoked(self, grant):
        """:returns: whether the secret that signed ``grant``'s token is no longer accepted."""
        return grant.secret not in self._secrets

    def check(self, token):
        """
        :returns: the :class:`Grant` of a token valid under any secret, now.
        :raises TokenRefused: no token, a bad one, an expired one, or one
            that lives longer than ``max_lifetime``.
        """
        if not token:
            raise TokenRefused("missing")
        for secret in self._secrets:
            try:
                claims = jwt.decode(
                    token, secret, algorithms=_ALGORITHMS, options=_DECODE_OPTIONS
                )
            except jwt.InvalidTokenError:
                continue
            grant = Grant(claims, secret)
            self._check_times(claims, self._clock.seconds())
            return grant
        raise TokenRefused("invalid")

    def _check_times(self, claims, now):
        """:raises TokenRefused: unless the times of ``claims`` allow the token ``now``."""
        exp, nbf, iat = claims["exp"], claims.get("nbf", now), claims.get("iat", now)
        if not (_is_time(exp) and _is_time(nbf) and _is_time(iat)):
            raise TokenRefused("invalid")
        if exp <= now:
            raise TokenRefused("expired")
        if nbf > now:
            raise TokenRefused("invalid")
        if self.max_lifetime and exp - min(iat, now) > self.max_lifetime:
            raise TokenRefused("lifetime")


def _bearer(header):
    """:returns: the token of an ``Authorization`` header's text when its scheme is ``Bearer``, else None."""
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def bearer_token(request):
    """
    :returns: the token of a twisted.web request's ``Authorization: Bearer``
        header (RFC 6750; RFC 9725 §4.4 for WHIP), or None for none, for
        another scheme (``Basic``), and for a header that is not ASCII.
    """
    header = request.getHeader(b"authorization")
    if not header:
        return None
    try:
        header = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    return _bearer(header)


def token_of(request):
    """:returns: the token of an Autobahn ``ConnectionRequest``: ``?token=`` or a Bearer header."""
    values = request.params.get("token")
    if values:
        return values[0]
    return _bearer(request.headers.get("authorization", ""))
