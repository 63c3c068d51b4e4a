'use strict';
/*
 * A minimal relay of the GStreamer webrtc examples' signalling protocol
 * (docs/protocol.md), on Node.js and the `ws` package: a rival for
 * signalling-bench (benchmarks/run-rivals), written to be as fast as a
 * simple Node relay is. It speaks what the bench's scenarios use:
 *
 *   HELLO <uid>                     -> HELLO, or ERROR and close 1002
 *   SESSION <uid>                   -> SESSION_OK, or ERROR peer '<uid>' not found / busy
 *   (in a session)                  every message relayed to the partner as it came;
 *                                   when one side closes, the other is closed with 1000
 *   ROOM <room_id>                  -> ROOM_OK <members...>; the others get ROOM_PEER_JOINED <uid>
 *   ROOM_PEER_MSG <uid> <payload>   -> <uid> gets ROOM_PEER_MSG <sender> <payload>
 *   ROOM_PEER_LIST                  -> ROOM_PEER_LIST <members...>
 *   (a room member closes)          the others get ROOM_PEER_LEFT <uid>
 *
 * Nothing else: no keepalive, no limits, no web pages or /health, no
 * per-message logging, no compression.
 *
 *   node server.js --host 127.0.0.1 --port 8080 [--cert cert.pem --key key.pem]
 *
 * With --cert and --key (PEM files) it serves wss:// (Node's https server).
 * It prints one line, "listening on ws[s]://HOST:PORT", once it listens.
 */

const fs = require('fs');
const http = require('http');
const https = require('https');
const { WebSocketServer } = require('ws');

function parseArgs(argv) {
  const options = { host: '127.0.0.1', port: 8080, cert: null, key: null };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i];
    const value = argv[i + 1];
    if (value === undefined || !['--host', '--port', '--cert', '--key'].includes(name)) {
      process.stderr.write('usage: node server.js --host HOST --port PORT [--cert CERT.pem --key KEY.pem]\n');
      process.exit(2);
    }
    options[name.slice(2)] = name === '--port' ? Number(value) : value;
  }
  if ((options.cert === null) !== (options.key === null)) {
    process.stderr.write('--cert and --key go together\n');
    process.exit(2);
  }
  return options;
}

const TEXT = { binary: false };
const BINARY = { binary: true };
// One run of whitespace, and a word (no whitespace), as the protocol counts them.
const HELLO = /^HELLO\s+(\S+)$/;
const COMMAND = /^(\S+)(?:\s+([\s\S]*))?$/;
const ROOM_PEER_MSG = /^ROOM_PEER_MSG\s+(\S+)\s+([\s\S]*)$/;

/** uid -> the peer's socket, for every registered peer. */
const peers = new Map();
/** room id -> Map of uid -> socket, in the order they joined. */
const rooms = new Map();

function refuse(ws, text, reason) {
  ws.send('ERROR ' + text);
  ws.close(1002, reason);
}

function onHello(ws, text) {
  const match = HELLO.exec(text);
  if (match === null) {
    if (text.startsWith('HELLO')) {
      refuse(ws, 'invalid peer uid', 'invalid peer uid');
    } else {
      refuse(ws, 'invalid protocol, expected HELLO', 'invalid protocol');
    }
    return;
  }
  const uid = match[1];
  if (peers.has(uid)) {
    refuse(ws, `invalid peer uid '${uid}': already registered`, 'invalid peer uid');
    return;
  }
  ws.uid = uid;
  peers.set(uid, ws);
  ws.send('HELLO');
}

function onSession(ws, uid) {
  const callee = uid === undefined ? undefined : peers.get(uid);
  if (callee === undefined) {
    ws.send(`ERROR peer '${uid === undefined ? '' : uid}' not found`);
  } else if (callee === ws) {
    ws.send('ERROR cannot start a session with yourself');
  } else if (callee.partner !== null || callee.room !== null) {
    ws.send(`ERROR peer '${uid}' busy`);
  } else {
    ws.partner = callee;
    callee.partner = ws;
    ws.send('SESSION_OK');
  }
}

function onRoom(ws, roomId) {
  if (roomId === undefined || /\s/.test(roomId) || roomId === 'session') {
    ws.send(`ERROR invalid room id '${roomId === undefined ? '' : roomId}'`);
    return;
  }
  let members = rooms.get(roomId);
  if (members === undefined) {
    members = new Map();
    rooms.set(roomId, members);
  }
  // ROOM_OK is always followed by one space, even for an empty room.
  ws.send('ROOM_OK ' + Array.from(members.keys()).join(' '));
  const joined = 'ROOM_PEER_JOINED ' + ws.uid;
  for (const member of members.values()) {
    member.send(joined);
  }
  members.set(ws.uid, ws);
  ws.room = roomId;
}

function onRoomCommand(ws, text) {
  const members = rooms.get(ws.room);
  if (text.startsWith('ROOM_PEER_MSG')) {
    const match = ROOM_PEER_MSG.exec(text);
    if (match === null) {
      ws.send('ERROR invalid ROOM_PEER_MSG: it needs a uid and a message');
      return;
    }
    const other = members.get(match[1]);
    if (other === undefined) {
      ws.send(peers.has(match[1])
        ? `ERROR peer '${match[1]}' is not in the room`
        : `ERROR peer '${match[1]}' not found`);
      return;
    }
    other.send('ROOM_PEER_MSG ' + ws.uid + ' ' + match[2]);
  } else if (text === 'ROOM_PEER_LIST') {
    const others = Array.from(members.keys()).filter((uid) => uid !== ws.uid);
    ws.send('ROOM_PEER_LIST ' + others.join(' '));
  } else {
    ws.send('ERROR invalid msg, already in room');
  }
}

function onMessage(data, isBinary) {
  const ws = this;
  if (ws.partner !== null) {
    ws.partner.send(data, isBinary ? BINARY : TEXT);
    return;
  }
  if (isBinary) {
    ws.send('ERROR binary messages are only relayed inside a session');
    return;
  }
  const text = data.toString();
  if (ws.uid === null) {
    onHello(ws, text);
  } else if (ws.room !== null) {
    onRoomCommand(ws, text);
  } else {
    const match = COMMAND.exec(text);
    const command = match === null ? '' : match[1];
    if (command === 'SESSION') {
      onSession(ws, match[2]);
    } else if (command === 'ROOM') {
      onRoom(ws, match[2]);
    } else {
      ws.send(`ERROR unknown command '${command}'`);
    }
  }
}

function onClose() {
  const ws = this;
  if (ws.uid !== null) {
    if (peers.get(ws.uid) === ws) {
      peers.delete(ws.uid);
    }
    const partner = ws.partner;
    if (partner !== null) {
      ws.partner = null;
      partner.partner = null;
      // The partner's uid is free at once; its connection is closed, 1000.
      if (peers.get(partner.uid) === partner) {
        peers.delete(partner.uid);
      }
      partner.close(1000);
    }
    if (ws.room !== null) {
      const members = rooms.get(ws.room);
      members.delete(ws.uid);
      if (members.size === 0) {
        rooms.delete(ws.room);
      } else {
        const left = 'ROOM_PEER_LEFT ' + ws.uid;
        for (const member of members.values()) {
          member.send(left);
        }
      }
      ws.room = null;
    }
  }
}

function onConnection(ws) {
  ws.uid = null;
  ws.partner = null;
  ws.room = null;
  ws.on('message', onMessage);
  ws.on('close', onClose);
  ws.on('error', () => {});
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  const tls = options.cert !== null;
  const server = tls
    ? https.createServer({ cert: fs.readFileSync(options.cert), key: fs.readFileSync(options.key) })
    : http.createServer();
  server.on('request', (request, response) => {
    response.writeHead(426, { 'Content-Type': 'text/plain', 'Content-Length': 15 });
    response.end('WebSocket only\n');
  });
  const wss = new WebSocketServer({ server, perMessageDeflate: false, clientTracking: false });
  wss.on('connection', onConnection);
  // The listen queue of our server's default (--backlog 4096), so that a
  // storm meets the same kernel limit on both sides.
  server.listen({ host: options.host, port: options.port, backlog: 4096 }, () => {
    const address = server.address();
    process.stdout.write(`listening on ${tls ? 'wss' : 'ws'}://${options.host}:${address.port}\n`);
  });
  // Stopping drops every connection at once: nothing is kept.
  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGINT', () => process.exit(0));
}

main();
