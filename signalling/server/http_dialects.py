"""
The HTTP side of the HTTP dialects (WHEP, WHIP): one resource per dialect of
the table that has an ``http_prefix``, on every port. It turns requests into
calls of the dialect's connection logic (:mod:`signalling.core.http_connections`)
and its answers and refusals into responses:

- ``POST <prefix><name>`` with ``application/sdp``: ``201 Created`` with the
  SDP answer, ``Location`` (the session's resource) and ``Link`` headers for
  the ICE servers (with fresh ``--turn-secret`` credentials);
- ``PATCH <prefix><name>/<session>`` with ``application/trickle-ice-sdpfrag``:
  ``204``; ``DELETE``: ``200``; ``404`` for a session that ended;
- ``OPTIONS``: CORS preflight (following ``--allowed-origin``), and every
  answer carries ``Access-Control-Allow-Origin`` and exposes ``Location``,
  ``Link`` and ``Retry-After``.

Statuses: 400 (a malformed offer, fragment or name), 401 (no valid token),
403 (a token or origin that does not allow it), 404 (no such producer or
session), 405, 413 (a body past ``--max-message-size``, at the channel),
415 (a wrong content type), 429 (past the request rate or the per-address
limit), 503 (full, draining, a cluster node without Redis, or no consumer in
time: with ``Retry-After``), 502 and 504 (the other side ended the session
or did not answer). A session is admitted by the handshake policy as a
WebSocket connection is (:meth:`signalling.server.policy.HandshakePolicy.admit_session`)
and counted as one for its life. Nothing a client sends reaches the log
unbounded, and no request ends in a traceback: an unexpected error is a 500
and one log line.
"""

import json
import secrets
from urllib.parse import quote as url_quote
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from signalling.core import sdp
from signalling.core.echo import clip, quote
from signalling.core.http_connections import Refusal
from signalling.core.interfaces import IConnectionOutput, SignallingError
from signalling.core.json_wire import MAX_ID_LENGTH
from signalling.server.auth import CLOSE_TOKEN, TOKEN_EXPIRED, TOKEN_REVOKED, bearer_token
from signalling.server.policy import Refused, RequestRates

_log = Logger(namespace="signalling.server.http_dialects")

SDP = b"application/sdp"
SDPFRAG = b"application/trickle-ice-sdpfrag"

_TOKEN_LABELS = {TOKEN_EXPIRED: "expired", TOKEN_REVOKED: "revoked"}

#: What the collection (``<prefix><name>``) and a session allow.
_COLLECTION_METHODS = b"POST, OPTIONS"
_SESSION_METHODS = b"PATCH, DELETE, OPTIONS"
_CORS_HEADERS = b"Authorization, Content-Type, If-Match, If-None-Match"
_EXPOSED = b"Location, Link, Retry-After, ETag, Accept-Patch, Accept-Post"


def _media_type(value):
    """:returns: the media type of a ``Content-Type`` value, lower case, without parameters."""
    if value is None:
        return None
    return value.split(b";", 1)[0].strip().lower()


def link_headers(ice_servers):
    """
    :param ice_servers: ``RTCIceServer`` dictionaries.
    :returns: the ``Link`` values that carry them (WHIP, RFC 9725 §4.6).
    """
    links = []
    for server in ice_servers:
        urls = server.get("urls")
        if isinstance(urls, str):
            urls = [urls]
        for url in urls or ():
            if not isinstance(url, str) or not url.isprintable() or ">" in url:
                continue
            link = f'<{url}>; rel="ice-server"'
            username, credential = server.get("username"), server.get("credential")
            if isinstance(username, str) and isinstance(credential, str):
                link += (
                    f"; username={json.dumps(username)}; credential={json.dumps(credential)}"
                    '; credential-type="password"'
                )
            links.append(link.encode("utf-8"))
    return links


@implementer(IConnectionOutput)
class HttpSession:
    """
    One session of an HTTP dialect, as its connection logic's output: the
    logic writes nothing to it (its answers go to the ``POST``), and closing
    it ends the session. It stands among the factory's open connections for
    its life, so that a shutdown (1001) and a token's end reach it as they
    reach a WebSocket.

    :ivar connection: the dialect's connection logic.
    :ivar session_key: the secret part of its resource's path.
    """

    def __init__(self, resource, peer_addr, grant, admission):
        self._resource = resource
        self.peer_addr = peer_addr
        self.grant = grant
        self._admission = admission
        self.connection = None
        self.session_key = secrets.token_urlsafe(18)
        #: The path its resource is under (its collection's, and a slash).
        self.collection = None
        self._token_call = None
        self._over = False

    # IConnectionOutput

    def send_text(self, text):
        pass

    def send_frames(self, frames):
        pass

    def probe(self, timeout):
        return defer.succeed(not self._over)

    def pause_reading(self, reason):
        pass

    def resume_reading(self, reason):
        pass

    def close(self, code, reason=None):
        """The logic ends the session (the client's ``DELETE``, the other side, a limit)."""
        self.over()

    # As a connection of the factory.

    def start(self, clock):
        """The session exists: it ends by itself when its token expires."""
        if self.grant is not None and self.grant.expires is not None:
            self._token_call = clock.callLater(
                max(0.0, self.grant.expires - clock.seconds()), self.token_ended, TOKEN_EXPIRED
            )

    def going_away(self):
        """The server stops: the session ends."""
        self.connection.going_away()

    def token_ended(self, reason):
        """Its token expired, or was revoked: the session ends."""
        if self._over:
            return
        self._resource.stats.token_closed(_TOKEN_LABELS[reason])
        self.connection.token_ended(CLOSE_TOKEN, reason)

    def over(self):
        """The session is over: the peer goes, and what it was counted as is given back."""
        if self._over:
            return
        self._over = True
        call, self._token_call = self._token_call, None
        if call is not None and call.active():
            call.cancel()
        self.connection.closing()
        self._resource.session_over(self)
        self.connection.lost(1000, self.connection.cause or "ended", log=False)


class HttpDialectResource(Resource):
    """
    The resources of one HTTP dialect, under its prefix.

    :param dialect: the :class:`signalling.core.dialects.Dialect`.
    :param ws_factory: the port's :class:`signalling.server.factory.SignallingServerFactory`
        (its registry, clock, settings, stats, policy and open connections).
    :param ice_servers: ``RTCIceServer`` dictionaries for the ``Link`` headers.
    :param turn: a :class:`signalling.server.turn.TurnCredentials`, or None.
    :param rates: the :class:`signalling.server.policy.RequestRates` shared
        by the port's HTTP dialects.
    """

    isLeaf = True

    def __init__(self, dialect, ws_factory, ice_servers=(), turn=None, rates=None):
        super().__init__()
        self.dialect = dialect
        self._factory = ws_factory
        self._ice_servers = list(ice_servers)
        self._turn = turn
        self._prefix = dialect.http_prefix.encode("ascii")
        self._rates = rates or RequestRates(ws_factory.clock, ws_factory.settings)
        #: Open sessions by their key.
        self.sessions = {}

    @property
    def stats(self):
        return self._factory.stats

    # Routing.

    def render(self, request):
        try:
            self._cors(request)
            return self._route(request)
        except Refusal as refusal:
            return self._refusal(request, refusal)
        except sdp.BadSdp as e:
            return self._refusal(request, Refusal(400, str(e)))
        except Exception:
            _log.failure(
                "unexpected error on a {dialect} request from {peer}",
                dialect=self.dialect.name,
                peer=_client_text(request),
            )
            return self._refusal(request, Refusal(500, "internal error"))

    def _route(self, request):
        parts = request.path[len(self._prefix) :].split(b"/")
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise Refusal(404, "no such resource")
        name = _path_name(parts[0])
        method = request.method
        if len(parts) == 1:
            if method == b"OPTIONS":
                return self._options(request, _COLLECTION_METHODS)
            if method == b"POST":
                return self._post(request, name)
            return self._not_allowed(request, _COLLECTION_METHODS)
        uid, dot, secret = parts[1].decode("latin-1").rpartition(".")
        if not dot or not uid or not secret or len(uid) > MAX_ID_LENGTH:
            raise Refusal(404, "no such session")
        if method == b"OPTIONS":
            return self._options(request, _SESSION_METHODS)
        if method == b"PATCH":
            if _media_type(request.getHeader(b"content-type")) != SDPFRAG:
                raise Refusal(415, "candidates must be application/trickle-ice-sdpfrag")
            return self._ask(request, uid, b"PATCH", secret, request.content.read())
        if method == b"DELETE":
            return self._ask(request, uid, b"DELETE", secret, b"")
        return self._not_allowed(request, _SESSION_METHODS)

    # The methods.

    def _post(self, request, name):
        factory = self._factory
        if factory.shutting_down or not factory.registry.up:
            raise Refusal(503, "the server cannot take new sessions now", retry_after=5)
        # The rate first: a refused request costs nothing more.
        key, exempt, client = self._client(request)
        if not self._rates.allows(key, exempt):
            raise Refusal(429, "too many requests", retry_after=self._rates.retry_after())
        if _media_type(request.getHeader(b"content-type")) != SDP:
            raise Refusal(415, "the offer must be application/sdp")
        offer = sdp.check_offer(request.content.read())
        policy = factory.policy
        try:
            grant, admission = policy.admit_session(
                self.dialect, _headers(request), bearer_token(request), key, exempt
            )
        except Refused as e:
            raise Refusal(e.status, e.text, retry_after=5 if e.status == 503 else None)
        session = HttpSession(self, client, grant, admission)
        session.connection = self.dialect.connection(factory, session)
        session.collection = self._prefix + url_quote(name, safe="").encode("ascii") + b"/"
        self.sessions[session.session_key] = session
        factory.connections.add(session)
        session.start(factory.clock)
        self.stats.http_session_opened(self.dialect.label)
        state = _Waiting()

        def gone(_):
            # A client that goes before its answer ends its session.
            state.gone = True
            if not state.answered:
                session.connection.end()

        request.notifyFinish().addErrback(gone)
        d = session.connection.begin(name, offer)
        d.addCallbacks(
            self._created, self._refused, callbackArgs=(request, session, state),
            errbackArgs=(request, state),
        )
        d.addErrback(self._failed, request, session, state)
        return NOT_DONE_YET

    def _created(self, answer, request, session, state):
        state.answered = True
        if state.gone:
            return
        self._status(request, 201)
        request.setHeader(b"content-type", SDP)
        # The session's resource names its peer, so that any node (or
        # worker) reaches it through the registry; the secret is the key.
        location = (
            session.collection + session.connection.uid.encode("ascii") + b"."
            + session.session_key.encode("ascii")
        )
        request.setHeader(b"location", location)
        request.setHeader(b"accept-patch", SDPFRAG)
        request.setHeader(b"etag", b'"' + session.session_key.encode("ascii") + b'"')
        for link in link_headers(self._ice_for(session)):
            request.responseHeaders.addRawHeader(b"link", link)
        request.setHeader(b"cache-control", b"no-store")
        request.write(answer.encode("utf-8"))
        request.finish()

    def _refused(self, failure, request, state):
        failure.trap(Refusal)
        state.answered = True
        if state.gone:
            return
        body = self._refusal(request, failure.value)
        request.write(body)
        request.finish()

    def _failed(self, failure, request, session, state):
        _log.failure(
            "unexpected error in a {dialect} session from {peer}",
            failure,
            dialect=self.dialect.name,
            peer=session.peer_addr,
        )
        session.over()
        if not (state.gone or request.finished):
            state.answered = True
            request.write(self._refusal(request, Refusal(500, "internal error")))
            request.finish()

    def _ask(self, request, uid, method, secret, body):
        """
        A request on a session: handed to the session's peer through the
        registry (:meth:`signalling.core.interfaces.IIds.ask`), which finds
        it in this process or on another node; its answer is the status.
        """
        self._session_request(request)
        question = method + b"\0" + secret.encode("latin-1") + b"\0" + body
        answer = self._factory.registry.ask(uid, question)
        if not isinstance(answer, defer.Deferred):
            return self._session_answer(answer, request)
        state = _Waiting()
        request.notifyFinish().addErrback(lambda _: setattr(state, "gone", True))

        def answered(result):
            if not state.gone:
                request.write(self._session_answer(result, request))
                request.finish()

        answer.addCallback(answered)
        answer.addErrback(self._failed_question, request, state)
        return NOT_DONE_YET

    def _session_answer(self, answer, request):
        """:returns: the body of the answer to a session's request (its status set)."""
        if answer is None:
            return self._refusal(request, Refusal(404, "no such session"))
        status, _, text = answer.partition(b" ")
        status = int(status) if status.isdigit() else 500
        if status >= 400:
            return self._refusal(request, Refusal(status, text.decode("utf-8", "replace")))
        self._status(request, status)
        if status == 200:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"The session ended.\n"
        return b""

    def _failed_question(self, failure, request, state):
        if failure.check(SignallingError):
            # The backend cannot serve now (a cluster node without Redis).
            refusal = Refusal(503, "the server cannot reach the session now", retry_after=5)
        else:
            _log.failure(
                "unexpected error on a {dialect} session request", failure,
                dialect=self.dialect.name,
            )
            refusal = Refusal(500, "internal error")
        if not (state.gone or request.finished):
            request.write(self._refusal(request, refusal))
            request.finish()

    def _session_request(self, request):
        """A request on a session: within the rate, and with a valid token when they are needed."""
        key, exempt, _ = self._client(request)
        if not self._rates.allows(key, exempt):
            raise Refusal(429, "too many requests", retry_after=self._rates.retry_after())
        try:
            self._factory.policy.grant_of_request(bearer_token(request))
        except Refused as e:
            raise Refusal(e.status, e.text)

    def _options(self, request, methods):
        self._status(request, 204)
        request.setHeader(b"allow", methods)
        if methods is _COLLECTION_METHODS:
            request.setHeader(b"accept-post", SDP)
        else:
            request.setHeader(b"accept-patch", SDPFRAG)
        return b""

    def _not_allowed(self, request, methods):
        request.setHeader(b"allow", methods)
        raise Refusal(405, "method not allowed")

    # Helpers.

    def _cors(self, request):
        """CORS for browser players, following ``--allowed-origin``."""
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        text = origin.decode("latin-1")
        if not self._factory.policy.origin_allowed(text, host):
            return
        request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"vary", b"Origin")
        request.setHeader(b"access-control-allow-methods", b"POST, PATCH, DELETE, OPTIONS")
        request.setHeader(b"access-control-allow-headers", _CORS_HEADERS)
        request.setHeader(b"access-control-expose-headers", _EXPOSED)
        request.setHeader(b"access-control-max-age", b"600")

    def _client(self, request):
        """
        :returns: the request's client key, whether it is exempt (see the
            policy), and its address for the log (the forwarded one behind a
            trusted proxy).
        """
        policy = self._factory.policy
        address = request.getClientAddress()
        host = getattr(address, "host", None)
        header = request.getHeader(b"x-forwarded-for")
        try:
            forwarded = policy.forwarded_address(
                None if header is None else header.decode("latin-1"), host
            )
        except Refused as e:
            raise Refusal(e.status, e.text)
        key, exempt = policy.client_key(host, forwarded)
        return key, exempt, (_client_text(request) if forwarded is None else str(forwarded))

    def _ice_for(self, session):
        servers = list(self._ice_servers)
        if self._turn is not None:
            servers += self._turn.ice_servers(session.connection.uid)
        return servers

    def _refusal(self, request, refusal):
        status = refusal.status
        self._status(request, status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if status == 401:
            request.setHeader(b"www-authenticate", b"Bearer")
        if refusal.retry_after is not None:
            request.setHeader(b"retry-after", str(int(refusal.retry_after)).encode("ascii"))
        if status >= 400 and status != 500:
            _log.debug(
                "{dialect} request from {peer} refused: {status} {reason}",
                dialect=self.dialect.name,
                peer=_client_text(request),
                status=status,
                reason=clip(refusal.text),
            )
        return (clip(refusal.text) + "\n").encode("utf-8")

    def _status(self, request, status):
        """Answer with ``status``, counted by dialect."""
        request.setResponseCode(status)
        self.stats.http_response(self.dialect.label, status)

    def session_over(self, session):
        """A session ended: forget it, give back what it was counted as."""
        if self.sessions.pop(session.session_key, None) is None:
            return
        self._factory.connections.discard(session)
        self._factory.policy.release_upgrade(session._admission)
        self.stats.http_session_closed(self.dialect.label)
        connection = session.connection
        _log.info(
            "{dialect} session of {uid} from {peer} with {name} ended ({cause})",
            dialect=self.dialect.name.upper(),
            uid=connection.uid,
            peer=session.peer_addr,
            name=quote(connection.name),
            cause=connection.cause or "ended",
        )


class _Waiting:
    """A ``POST`` that waits: whether it was answered, and whether its client went."""

    __slots__ = ("answered", "gone")

    def __init__(self):
        self.answered = False
        self.gone = False


def _path_name(segment):
    """
    :returns: a path segment as the name it spells (percent-decoded UTF-8).
    :raises Refusal: 400 for one that is not UTF-8, holds control
        characters, or is longer than an id may be.
    """
    try:
        name = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "the name is not UTF-8")
    if not name or not name.isprintable():
        raise Refusal(400, "the name holds characters a name may not")
    if len(name) > MAX_ID_LENGTH:
        raise Refusal(400, f"the name is longer than {MAX_ID_LENGTH} characters")
    return name


def _headers(request):
    """:returns: the headers the policy reads, lower-case names, as text."""
    headers = {}
    for name in (b"origin", b"host"):
        value = request.getHeader(name)
        if value is not None:
            headers[name.decode("ascii")] = value.decode("latin-1")
    return headers


def _client_text(request):
    """:returns: the request's client address, for logs."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    if host is None:
        return "unix"
    return f"{host}:{getattr(address, 'port', 0)}"

