"""
Reaching a peer held on another node. Reclaiming a uid: a ``HELLO`` that
wants the uid back asks the holder's node to ping its peer (a *probe*) and
replaces it if no pong comes back in time; a node answers the probes other
nodes ask of its own peers. Questions (:meth:`signalling.core.interfaces.IIds.ask`):
an HTTP dialect's request for a session another node holds goes to that
node's peer, and its answer comes back.
"""

import uuid

from twisted.internet import defer

from signalling.cluster import channel


class RemoteHolder:
    """
    The holder of a uid on another node, as a ``HELLO`` that wants the uid
    back sees it (see ``Connection._reclaim``, which uses ``probe``,
    ``replaced`` and ``peer_addr`` of :meth:`IRegistry.peer_of`'s answer):
    its probe and its replacement go through Redis to the holder's node.
    """

    def __init__(self, probes, uid):
        self._probes = probes
        self._uid = uid
        self._where = None
        self._probed = False
        self.receiver = None

    @property
    def peer_addr(self):
        node = self._where[0] if self._where else "another node"
        return f"cluster node {node}"

    def probe(self, timeout):
        d = self._probes.ask(self._uid, timeout)

        def answered(result):
            alive, self._where = result
            self._probed = True
            return alive

        d.addCallback(answered)
        d.addErrback(lambda f: True)
        return d

    def replaced(self):
        if self._probed:
            # Found silent by its probe: that very connection goes.
            self._probes.replace(self._uid, self._where)
        else:
            # A token for the uid takes it over at once, from whoever holds it.
            self._probes.evict(self._uid)


class Probes:
    """
    A node's probes of other nodes' peers, and its answers to theirs.

    :param backend: the node (its ``node`` id, ``call``, ``cast`` and ``relay``).
    :param clock: an ``IReactorTime`` for the probes' timeouts.
    """

    def __init__(self, backend, clock):
        self._backend = backend
        self._clock = clock
        #: token (bytes) -> the Deferred of an answer this node waits for
        self._waiting = {}

    def ask(self, uid, timeout):
        """
        Ask the node holding ``uid`` to ping its peer.

        :returns: a Deferred firing ``(alive, (node, conn))``: whether its
            pong came back within ``timeout`` seconds (False when no node
            answers in time), and where the holder was.
        """
        # The holder's node answers within ``timeout``; a node that cannot
        # answer (gone, or far behind) counts as silent.
        d = self._through_holder(
            uid, channel.DIALECT_EXAMPLES, timeout + 1.0, False,
            lambda conn, token: channel.probe(conn, self._backend.node, token, timeout),
        )  # fmt: skip
        d.addCallback(lambda result: (bool(result[0]), result[1]))
        return d

    def question(self, uid, question, timeout):
        """
        Hand ``question`` to the peer holding ``uid`` on whichever node.

        :returns: a Deferred of its answer (bytes), or None when no node
            holds ``uid`` or none answers within ``timeout`` seconds.
        """
        d = self._through_holder(
            uid, channel.DIALECT_JSON, timeout, None,
            lambda conn, token: channel.ask(conn, self._backend.node, token, question),
        )  # fmt: skip
        d.addCallback(lambda result: result[0])
        return d

    def _through_holder(self, uid, dialect, timeout, missing, message):
        """
        Find the node holding ``uid`` (a peer of ``dialect``), send it
        ``message(conn, token)`` and wait for the answer to ``token``.

        :returns: a Deferred firing ``(answer, (node, conn))``, or
            ``(missing, None)`` when no node holds ``uid``; ``missing`` as
            the answer when none comes within ``timeout`` seconds.
        """
        located = self._backend.call("locate", uid, dialect)

        def send(where):
            if not where:
                return missing, None
            node, conn = channel.text(where[0]), channel.text(where[1])
            token = uuid.uuid4().hex.encode()
            d = self.wait(token)
            self._backend.relay(node, message(conn, token.decode()))
            d.addTimeout(timeout, self._clock, lambda *_: self._waiting.pop(token, None) and missing)
            d.addCallback(lambda answer: (answer, (node, conn)))
            return d

        located.addCallback(send)
        return located

    def question_answered(self, body):
        """A question's answer arrived (the body of a :data:`~channel.Kind.ASK_ANSWER`)."""
        token, answer = channel.read_ask_answer(body)
        d = self._waiting.pop(token, None)
        if d is not None and not d.called:
            d.callback(answer)

    def question_asked(self, peer, body):
        """Another node hands ``peer`` a question (the body of a :data:`~channel.Kind.ASK`): answer it."""
        asker, token, question = channel.read_ask(body)
        answer = defer.maybeDeferred(peer.asked, question)
        answer.addErrback(lambda f: None)
        answer.addCallback(
            lambda result: self._backend.relay(asker, channel.ask_answer(token, result))
        )

    def wait(self, token):
        """:returns: a Deferred fired with the answer to ``token`` (bytes: a probe's or a question's) once it arrives."""
        d = self._waiting[token] = defer.Deferred()
        return d

    def answered(self, body):
        """A probe's answer arrived (the body of a :data:`~channel.Kind.PROBE_ANSWER`)."""
        token, alive = channel.read_probe_answer(body)
        d = self._waiting.pop(token, None)
        if d is not None and not d.called:
            d.callback(alive)

    def asked(self, peer, fields):
        """Another node asks to ping ``peer`` (the fields of a :data:`~channel.Kind.PROBE`): answer it."""
        asker, token, timeout = fields[0], fields[1], float(fields[2])
        answer = peer.probe(timeout)
        answer.addErrback(lambda f: False)
        answer.addCallback(
            lambda alive: self._backend.relay(asker, channel.probe_answer(token.encode(), alive))
        )

    def evict(self, uid):
        """Remove whoever holds ``uid`` and have its node close it (1008)."""
        self._backend.cast("evict", uid)

    def replace(self, uid, where):
        """Remove ``uid``'s holder at ``where`` (``(node, conn)``) and have its node close it (1008)."""
        if where is not None:
            self._backend.cast("replace", uid, *where)
