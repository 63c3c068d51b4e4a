"""
The logic of the HTTP dialects: WHEP (watch a producer) and WHIP (publish to
a consumer). Each session is a peer of the JSON dialect inside the server:
its client's requests become the JSON messages a ``webrtcsrc`` (WHEP) or a
``webrtcsink`` (WHIP) would send, handled by the JSON dialect's own path
(:class:`signalling.core.json_connection.JsonConnection`: its parsing, rate,
token claims, size limits, registry calls and ordering), so that every
guarantee of that path holds here without being written again; and what the
registry tells the peer is gathered into the HTTP answer.

- WHEP: ``POST`` with the viewer's offer starts a session with the producer
  (``startSession`` with ``offer``); the producer's answer, with the
  candidates it sends until none came for ``candidate_wait`` seconds, is the
  ``201``'s body.
- WHIP: ``POST`` with the publisher's offer registers a producer (``meta``
  names it, and says ``"whip": true``); the first consumer that starts a
  session with it is sent the offer, and its answer (with its candidates)
  is the ``201``'s body. One consumer per publish: WHIP is one peer
  connection.
- ``PATCH`` sends the client's candidates as ``peer`` ICE messages;
  ``DELETE`` (or the other side's end) ends the session and lets go of the
  peer.

The HTTP side (``signalling.server.http_dialects``) turns a
:class:`Refusal` into its status.
"""

import hmac
import json

from twisted.internet import defer

from signalling.core import json_wire, sdp
from signalling.core.echo import quote
from signalling.core.connection import ConnectionCommon
from signalling.core.json_connection import JsonConnection


class Refusal(Exception):
    """
    A request the dialect refuses, with the HTTP status the drafts name.

    :ivar status: the status code.
    :ivar text: the reason, for the body and the log (bounded).
    :ivar retry_after: seconds for ``Retry-After``, or None.
    """

    def __init__(self, status, text, retry_after=None):
        super().__init__(status, text)
        self.status = status
        self.text = text
        self.retry_after = retry_after


#: The HTTP status of a refusal by the JSON dialect's path, by its kind.
_STATUS_OF_KIND = {
    "not_allowed": 403,
    "rate_limited": 429,
    "meta_too_large": 400,
}


def _fields(message):
    """
    :returns: the fields of a ``peer`` message the registry hands over: as
        parsed here, or parsed from its text when it came from another
        cluster node (which forwards the frame as it came); None for what
        does not parse as a ``peer`` message.
    """
    if message.fields is not None:
        return message.fields
    try:
        parsed = json_wire.parse(message.raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    return parsed.fields if parsed is not None and parsed.type == "peer" else None


def whep_token_allows(grant):
    """:returns: whether a token lets its holder watch: its ``roles`` (if any) hold consumer."""
    return grant.allows_roles([json_wire.CONSUMER])


def whip_token_allows(grant):
    """:returns: whether a token lets its holder publish: its ``roles`` (if any) hold producer."""
    return grant.allows_roles([json_wire.PRODUCER])


class _HttpSession(JsonConnection):
    """
    What WHEP and WHIP sessions share: a JSON peer driven by HTTP requests.
    The output is the HTTP side's session object, which ends the session
    when the connection's logic closes it (:meth:`IConnectionOutput.close`).

    :ivar name: what the request path named (a producer, or a stream).
    :ivar session_id: the JSON session's id, once started.
    """

    #: The log's name of the dialect.
    dialect_name = None

    def __init__(self, shared, output):
        super().__init__(shared, output)
        self.name = None
        self.session_id = None
        self._offer = None
        self._mids = ()
        self._result = None
        self._answer = None
        self._candidates = []
        self._quiet = None
        self._deadline = None
        #: Candidates the client sent before the session started.
        self._early = []
        self.ended = False

    def __repr__(self):
        return f"<{type(self).__name__} {self.uid or '?'} at {self._output.peer_addr}>"

    # What the HTTP side asks.

    def begin(self, name, offer):
        """
        Start: welcome the peer, and go on in the dialect's way.

        :param name: what the request path named.
        :param offer: the client's SDP offer (checked: see
            :func:`signalling.core.sdp.check_offer`).
        :returns: a Deferred of the SDP answer to send back, failing with a
            :class:`Refusal`.
        """
        self.name = name
        self._offer = offer
        self._mids = sdp.sections(offer)
        result = self._result = defer.Deferred()
        self._deadline = self._shared.clock.callLater(
            self._answer_timeout(), self._timed_out
        )
        self.opened()
        # (Already fired, when refused at once.)
        return result

    def trickle(self, candidates):
        """
        The client's candidates (``(sdpMLineIndex, candidate)`` pairs, from
        a ``PATCH``): sent to the other side as ``peer`` ICE messages, or
        kept until the session starts.

        :raises Refusal: 404 once the session ended.
        """
        if self.ended or self._closing:
            raise Refusal(404, "the session ended")
        if self.session_id is None:
            self._early.extend(candidates)
            del self._early[sdp.MAX_CANDIDATES :]
            return
        for index, candidate in candidates:
            self._send_candidate(index, candidate)

    def end(self):
        """The client ended the session (``DELETE``): the other side is told, the peer goes."""
        self._end_here("ended by the client")

    def asked(self, question):
        """
        A request on the session's resource, from whichever process took it
        (see :meth:`signalling.core.interfaces.IIds.ask`): ``METHOD NUL
        secret NUL body``. The secret must be the session's own (the output's
        ``session_key``; its resource's path carries it).

        :returns: the status, and for a refusal its reason (``b"400 ..."``).
        """
        method, _, rest = question.partition(b"\0")
        secret, _, body = rest.partition(b"\0")
        own = self._output.session_key.encode("ascii")
        if self.ended or self._closing or not hmac.compare_digest(secret, own):
            return b"404 no such session"
        if method == b"DELETE":
            self.end()
            return b"200"
        if method != b"PATCH":
            return b"405 method not allowed"
        try:
            candidates, _ = sdp.fragment_candidates(body, self._mids)
            self.trickle(candidates)
        except sdp.BadSdp as e:
            return b"400 " + str(e).encode("utf-8")
        except Refusal as e:
            return f"{e.status} {e.text}".encode("utf-8")
        return b"204"

    # The JSON dialect's path, as the client's messages.

    def _say(self, message):
        """Handle ``message`` as if the client had sent it (the JSON dialect's whole path)."""
        self.received(json.dumps(message).encode("utf-8"), False)

    def _send_candidate(self, index, candidate):
        self._say(
            {
                "type": "peer",
                "sessionId": self.session_id,
                "ice": {"candidate": candidate, "sdpMLineIndex": index},
            }
        )

    def _flush_early(self):
        early, self._early = self._early, []
        for index, candidate in early:
            self._send_candidate(index, candidate)

    # The answer.

    def _answer_timeout(self):
        return self._settings.answer_timeout

    def _got_answer(self, answer):
        """The other side's answer came: the candidates that follow it go with it."""
        if self._answer is not None or self._result is None:
            return
        self._answer = answer
        self._restart_quiet()

    def _got_candidate(self, ice):
        if self._result is None:
            return  # the answer went out: nothing can carry it now
        candidate = ice["candidate"]
        if not candidate:
            # An empty candidate: the other side's gathering is complete.
            if self._answer is not None:
                self._answered()
            return
        if len(self._candidates) < sdp.MAX_CANDIDATES:
            self._candidates.append((ice["sdpMLineIndex"], candidate))
        if self._answer is not None:
            self._restart_quiet()

    def _restart_quiet(self):
        clock = self._shared.clock
        wait = self._settings.candidate_wait
        if self._quiet is not None and self._quiet.active():
            self._quiet.reset(wait)
        else:
            self._quiet = clock.callLater(wait, self._answered)

    def _answered(self):
        """No candidate came for a while (or the last one): answer the client."""
        self._cancel_timers()
        result, self._result = self._result, None
        if result is None:
            return
        answer = sdp.with_candidates(self._answer, self._candidates)
        self._candidates = []
        self._log.info(
            "{dialect} session {session_id} of {uid} with {name}: answered",
            dialect=self.dialect_name,
            session_id=self.session_id,
            uid=self.uid,
            name=quote(self.name),
        )
        result.callback(answer)

    def _refuse(self, status, text, retry_after=None):
        """Refuse the client's ``POST`` (if it waits still) and end the session."""
        result, self._result = self._result, None
        self._end_here(text)
        if result is not None:
            result.errback(Refusal(status, text, retry_after))

    def _timed_out(self):
        self._deadline = None
        self._refuse(*self._timeout_refusal())

    def _cancel_timers(self):
        for name in ("_quiet", "_deadline"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()

    # The end.

    def _end_here(self, cause):
        """End the session from this side: the peer goes (the other side is told)."""
        if self.ended:
            return
        self.ended = True
        self.cause = cause
        self._cancel_timers()
        self._output.close(1000, None)

    def _let_go(self):
        """The connection's end, whatever its cause: a waiting ``POST`` is refused."""
        self.ended = True
        self._cancel_timers()
        result, self._result = self._result, None
        if result is not None:
            result.errback(Refusal(503, self.cause or "the session ended", retry_after=1))

    def _other_side_ended(self, session_id, error):
        if session_id != self.session_id:
            return
        cause = "the other side ended the session" + (f": {error}" if error else "")
        self._refuse(502, cause)

    # Refusals on the JSON dialect's path.

    def _send_error(self, details, kind="json_refused"):
        # Counted and logged as every dialect's refusals (its text goes nowhere).
        ConnectionCommon._send_error(self, details, kind)
        self._refuse(_STATUS_OF_KIND.get(kind, self._refused_status), details)

    #: The status of a refusal of the registry (a producer gone meanwhile).
    _refused_status = 404

    # What the JSON dialect writes to its clients: nothing here.

    def _send_text(self, text):
        pass

    def peer_status_changed(self, peer_id, roles, meta):
        pass


class WhepSession(_HttpSession):
    """
    A WHEP viewer: a JSON consumer that starts a session with the producer
    the path names (its peer id, or the ``name`` in its ``meta``), with the
    viewer's offer, and returns the producer's answer.
    """

    dialect_name = "WHEP"

    def _welcomed(self, result):
        self.uid = self._peer_id
        self._queued = None
        self._call(self._found, self._shared.registry.json_peers, json_wire.PRODUCER)

    def _found(self, producers):
        """The producers: the one named by id, else the oldest whose meta names it."""
        name = self.name
        match = None
        for peer_id, meta in producers:
            if peer_id == name:
                match = (peer_id, meta)
                break
        if match is None:
            for peer_id, meta in producers:
                if json_wire.meta_name(meta) == name:
                    match = (peer_id, meta)
                    break
        if match is None:
            self._refuse(404, f"no producer {quote(name)}")
            return
        if not self._may_call(match[1]):
            self._refuse(403, f"the token does not allow watching {quote(name)}")
            return
        self._say({"type": "startSession", "peerId": match[0], "offer": self._offer})

    def json_session_started(self, peer_id, session_id):
        self._adopt(session_id)

    def _adopt(self, session_id):
        """
        The session exists: from ``sessionStarted``, or from the producer's
        first message when that overtakes it (a cluster delivers what two
        peers cause in any order; the viewer is in one session only).
        """
        if self.session_id is not None:
            return
        self.session_id = session_id
        self._log.info(
            "WHEP session {session_id} of {uid} from {peer_addr} with {name}",
            session_id=session_id,
            uid=self.uid,
            peer_addr=self._output.peer_addr,
            name=quote(self.name),
        )
        self._flush_early()

    def json_start_session(self, peer_id, session_id, offer):
        """A WHEP viewer produces nothing: a session asked of it ends at once."""
        self._say({"type": "endSession", "sessionId": session_id})

    def json_peer_message(self, message):
        fields = _fields(message)
        if fields is None:
            return
        self._adopt(fields["sessionId"])
        if fields["sessionId"] != self.session_id:
            return
        if "sdp" in fields:
            description = fields["sdp"]
            if description["type"] != "answer":
                self._refuse(502, "the producer sent an offer, not an answer to the viewer's")
                return
            self._got_answer(description["sdp"])
        else:
            self._got_candidate(fields["ice"])

    def json_session_ended(self, session_id, error):
        self._other_side_ended(session_id, error)

    def _timeout_refusal(self):
        return 504, "the producer did not answer in time"


class WhipSession(_HttpSession):
    """
    A WHIP publisher: a JSON producer named by the path, whose offer goes to
    the first consumer that starts a session with it; that consumer's answer
    is returned.
    """

    dialect_name = "WHIP"

    def _welcomed(self, result):
        self.uid = self._peer_id
        self._queued = None
        self._log.info(
            "WHIP stream {name} published as {uid} from {peer_addr}",
            name=quote(self.name),
            uid=self.uid,
            peer_addr=self._output.peer_addr,
        )
        self._say(
            {
                "type": "setPeerStatus",
                "roles": [json_wire.PRODUCER],
                "meta": {"name": self.name, "whip": True},
            }
        )

    def _answer_timeout(self):
        return self._settings.whip_wait

    def json_start_session(self, peer_id, session_id, offer):
        if self.session_id is not None or self._result is None or offer is not None:
            # One consumer per publish; and the publisher made the offer.
            self._say({"type": "endSession", "sessionId": session_id})
            return
        self.session_id = session_id
        self._log.info(
            "WHIP stream {name} ({uid}) sent to consumer {peer_id} in session {session_id}",
            name=quote(self.name),
            uid=self.uid,
            peer_id=peer_id,
            session_id=session_id,
        )
        self._say(
            {
                "type": "peer",
                "sessionId": session_id,
                "sdp": {"type": "offer", "sdp": self._offer},
            }
        )
        self._flush_early()

    def json_session_started(self, peer_id, session_id):
        """A WHIP publisher consumes nothing."""

    def json_peer_message(self, message):
        fields = _fields(message)
        if fields is None or fields["sessionId"] != self.session_id:
            return
        if "sdp" in fields:
            # The registry passes no offer from a consumer.
            self._got_answer(fields["sdp"]["sdp"])
        else:
            self._got_candidate(fields["ice"])

    def json_session_ended(self, session_id, error):
        # Its one consumer left: WHIP cannot offer again, the stream ends.
        self._other_side_ended(session_id, error)

    def _timeout_refusal(self):
        if self.session_id is None:
            return 503, "no consumer came for the stream in time", 5
        return 504, "the consumer did not answer in time"

    _refused_status = 400
