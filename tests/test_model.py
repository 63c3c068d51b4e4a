"""
A property-based test (hypothesis) of the per-connection logic against a
model of the protocol: a few peers send random sequences of commands,
messages, garbage, binary frames and closes; after each step every peer
must have received exactly what the model says (in order), and the server's
registry must agree with the model. At the end everything is closed and
nothing may be left behind.

The server is the in-memory one of ``tests/servers.py`` (real Autobahn
clients over ``iosim``), over the in-memory registry and over the reordering
backend of ``tests/backends.py``.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tests import backends
from tests.servers import Loopback

PEERS = 4
UIDS = ["u0", "u1", "u2", "u3"]
ROOMS = ["r0", "r1"]

action = st.one_of(
    st.tuples(st.just("hello"), st.sampled_from(UIDS)),
    st.tuples(st.just("session"), st.sampled_from(UIDS)),
    st.tuples(st.just("room"), st.sampled_from(ROOMS)),
    st.tuples(st.just("msg"), st.sampled_from(UIDS), st.sampled_from(["hi", "a b  c", "é"])),
    st.tuples(st.just("list")),
    st.tuples(st.just("text"), st.sampled_from(["offer", "SESSION u1", "ROOM r0", "", "  ", "\x01"])),
    st.tuples(st.just("binary")),
    st.tuples(st.just("close")),
    st.tuples(st.just("reconnect")),
)
steps = st.lists(st.tuples(st.integers(0, PEERS - 1), action), min_size=1, max_size=40)


class Model:
    """What the protocol says happens, peer by peer."""

    def __init__(self):
        #: per peer: None (closed) or a dict with uid, partner, room
        self.peers = [{"uid": None, "partner": None, "room": None} for _ in range(PEERS)]
        self.expected = [[] for _ in range(PEERS)]
        self.rooms = {}  # room id -> [peer indices in join order]

    def index_of(self, uid):
        for i, peer in enumerate(self.peers):
            if peer is not None and peer["uid"] == uid:
                return i
        return None

    def say(self, i, line):
        self.expected[i].append(line)

    def close(self, i):
        """Peer ``i``'s connection closes: its partner is closed, its room told."""
        peer = self.peers[i]
        if peer is None:
            return
        self.peers[i] = None
        if peer["partner"] is not None:
            self.peers[peer["partner"]] = None
        room = peer["room"]
        if room is not None:
            members = self.rooms[room]
            members.remove(i)
            for j in members:
                self.say(j, f"ROOM_PEER_LEFT {peer['uid']}")
            if not members:
                del self.rooms[room]

    def step(self, i, act):
        """:returns: what the peer sends, (text or None, is_binary), or "close"/"reconnect"."""
        peer = self.peers[i]
        kind = act[0]
        if kind in ("close", "reconnect"):
            self.close(i)
            if kind == "reconnect":
                self.peers[i] = {"uid": None, "partner": None, "room": None}
            return kind
        if peer is None:
            return None  # a closed peer sends nothing
        text, binary = {
            "hello": (lambda: f"HELLO {act[1]}", False),
            "session": (lambda: f"SESSION {act[1]}", False),
            "room": (lambda: f"ROOM {act[1]}", False),
            "msg": (lambda: f"ROOM_PEER_MSG {act[1]} {act[2]}", False),
            "list": (lambda: "ROOM_PEER_LIST", False),
            "text": (lambda: act[1], False),
            "binary": (lambda: "\x00bin", True),
        }[kind]
        text = text()
        if peer["partner"] is not None:
            # In a session everything is relayed verbatim.
            self.say(peer["partner"], text.encode() if binary else text)
            return text, binary
        if peer["uid"] is None:
            words = text.split(None, 1)
            if binary or len(words) != 2 or words[0] != "HELLO" or self.index_of(words[1]) is not None:
                self.say(i, "ERROR")  # refused, then closed with 1002
                self.close(i)
            else:
                peer["uid"] = words[1]
                self.say(i, "HELLO")
            return text, binary
        words = text.split(None, 1)
        command = words[0] if words else ""
        rest = words[1] if len(words) > 1 else ""
        if binary:
            self.say(i, "ERROR")
        elif peer["room"] is not None:
            if command == "ROOM_PEER_MSG":
                parts = rest.split(None, 1)
                if len(parts) < 2:
                    self.say(i, "ERROR")
                else:
                    j = self.index_of(parts[0])
                    if j is None or j not in self.rooms[peer["room"]]:
                        self.say(i, "ERROR")
                    else:
                        self.say(j, f"ROOM_PEER_MSG {peer['uid']} {parts[1]}")
            elif command == "ROOM_PEER_LIST":
                others = [self.peers[j]["uid"] for j in self.rooms[peer["room"]] if j != i]
                self.say(i, "ROOM_PEER_LIST " + " ".join(others))
            else:
                self.say(i, "ERROR")
        elif command == "SESSION" and rest:
            j = self.index_of(rest)
            if j is None or j == i or self.peers[j]["partner"] is not None or self.peers[j]["room"] is not None:
                self.say(i, "ERROR")
            else:
                peer["partner"], self.peers[j]["partner"] = j, i
                self.say(i, "SESSION_OK")
        elif command == "ROOM" and rest in ROOMS:
            members = self.rooms.setdefault(rest, [])
            self.say(i, "ROOM_OK " + " ".join(self.peers[j]["uid"] for j in members))
            for j in members:
                self.say(j, f"ROOM_PEER_JOINED {peer['uid']}")
            members.append(i)
            peer["room"] = rest
        else:
            self.say(i, "ERROR")
        return text, binary


def normalise(received):
    """ERROR lines compare by their word only; the model does not spell reasons."""
    return ["ERROR" if isinstance(m, str) and m.startswith("ERROR ") else m for m in received]


class ModelTests(unittest.TestCase):
    """The connection logic agrees with the model, step by step."""

    backend = staticmethod(backends.memory)

    def run_steps(self, plan, seed=0):
        # A port of the examples' protocol: the model's peers connect first
        # and say HELLO later (on an auto port, a silent connection would be
        # welcomed as a JSON client once the backend's deliveries move the
        # clock past the margin).
        net = Loopback(self, backend=self.backend, seed=seed, dialect="examples")
        clients = [net.client() for _ in range(PEERS)]
        net.flush()
        model = Model()
        # Most plans start with every peer registered, so that sessions and
        # rooms come about; the random steps may close and reconnect them.
        plan = [(i, ("hello", UIDS[i])) for i in range(PEERS)] + list(plan)
        for i, act in plan:
            sent = model.step(i, act)
            if sent in ("close", "reconnect"):
                if clients[i].close_info is None:
                    clients[i].sendClose(1000)
                net.flush()
                clients[i].drain()
                if sent == "reconnect":
                    clients[i] = net.client()
            elif sent is not None:
                text, binary = sent
                if clients[i].close_info is None:
                    clients[i].sendMessage(text.encode("utf-8"), isBinary=binary)
            net.flush()
            for j, client in enumerate(clients):
                self.assertEqual(
                    normalise(client.drain()), model.expected[j], (j, plan)
                )
                model.expected[j] = []
                alive = model.peers[j] is not None
                self.assertEqual(client.close_info is None, alive, (j, plan))
        for client in clients:
            if client.close_info is None:
                client.sendClose(1000)
        net.flush()
        self.assertTrue(net.registry.is_empty(), plan)
        self.assertEqual(net.factory.getConnectionCount(), 0)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(steps)
    def test_the_connection_logic_agrees_with_the_model(self, plan):
        """Random steps by four peers: every peer hears what the model says."""
        self.run_steps(plan)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(steps, st.integers(0, 10_000))
    def test_the_model_holds_over_a_reordering_backend(self, plan, seed):
        """The same, with results and notifications in any order the contract allows."""
        self.backend = backends.reordering
        self.run_steps(plan, seed)
