/*
 * The call page of the signalling server: registers with HELLO, calls a peer
 * (SESSION), accepts calls, or joins a room and meshes with every member.
 * Negotiation messages are the GStreamer examples' JSON:
 *   {"sdp": {"type": "offer"|"answer", "sdp": "..."}}
 *   {"ice": {"candidate": "...", "sdpMLineIndex": N}}
 * and the plain text OFFER_REQUEST (the receiver makes the offer).
 * Plain JavaScript, no build step, nothing loaded from elsewhere.
 */
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const config = readConfig();

  // ---------------------------------------------------------------- config

  function readConfig() {
    try {
      return JSON.parse($('config').textContent) || {};
    } catch (e) {
      return {};
    }
  }

  /*
   * One ICE server setting: a URL (stun:host:port, turn:host:port,
   * GStreamer's turn://user:password@host:port) or JSON (an RTCIceServer
   * object or a list of them). Returns a list of RTCIceServer objects.
   */
  function parseIceServer(text) {
    text = text.trim();
    if (text.startsWith('{') || text.startsWith('[')) {
      const value = JSON.parse(text);
      const list = Array.isArray(value) ? value : [value];
      for (const server of list) {
        if (!server || !server.urls) throw new Error('an ICE server needs "urls": ' + text);
      }
      return list;
    }
    const withAuth = /^(stuns?|turns?):\/\/(?:([^:@]*)(?::([^@]*))?@)?(.+)$/.exec(text);
    if (withAuth) {
      const server = {urls: withAuth[1] + ':' + withAuth[4]};
      if (withAuth[2] !== undefined) server.username = decodeURIComponent(withAuth[2]);
      if (withAuth[3] !== undefined) server.credential = decodeURIComponent(withAuth[3]);
      return [server];
    }
    if (/^(stuns?|turns?):[^\s]+$/.test(text)) return [{urls: text}];
    throw new Error('not an ICE server URL: ' + text);
  }

  function iceServersFromPage() {
    const given = params.getAll('ice');
    if (given.length === 0) return config.iceServers || [];
    const servers = [];
    for (const value of given) {
      if (value.trim() === '' || value.trim() === 'none') continue;
      servers.push(...parseIceServer(value));
    }
    return servers;
  }

  function randomId() {
    return String(1000 + Math.floor(Math.random() * 9000));
  }

  let iceServers = [];
  let iceError = null;
  try {
    iceServers = iceServersFromPage();
  } catch (e) {
    iceError = e.message;
  }
  const chosenId = (params.get('id') || '').trim();
  let ourId = chosenId || randomId();
  const token = (params.get('token') || '').trim();
  const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/' +
    (token ? '?token=' + encodeURIComponent(token) : '');

  // -------------------------------------------------------------- display

  const callStatus = $('call-status');
  const serverStatus = $('server-status');

  function log(...args) {
    console.log('[call]', ...args);
  }

  /* The call's state as a person reads it; data-state is for styling and tests. */
  function setCallStatus(state, text) {
    if (callStatus.dataset.state === state && callStatus.textContent === text) return;
    callStatus.dataset.state = state;
    callStatus.textContent = text;
    document.body.dataset.callState = state;
    log(state + ': ' + text);
  }

  function setServerStatus(state, text) {
    serverStatus.dataset.state = state;
    serverStatus.textContent = text;
  }

  function updateControls() {
    const busy = mode !== 'idle';
    $('call-button').disabled = busy || !registered;
    $('room-button').disabled = busy || !registered;
    $('hangup-button').disabled = !busy;
  }

  function showMediaNote(text) {
    const note = $('media-note');
    note.textContent = text;
    note.hidden = !text;
  }

  function describeIceServers() {
    if (iceError) return 'invalid setting: ' + iceError;
    if (iceServers.length === 0) return 'none (direct connections only)';
    return iceServers.map((s) => [].concat(s.urls).join(', ')).join('; ');
  }

  // --------------------------------------------------------- local media

  let localStream = null;
  let localNote = '';

  /* A moving test pattern from a canvas, for a page without a camera. */
  function testPattern() {
    const canvas = document.createElement('canvas');
    canvas.width = 640;
    canvas.height = 360;
    const g = canvas.getContext('2d');
    const bars = ['#c0c0c0', '#c0c000', '#00c0c0', '#00c000', '#c000c0', '#c00000', '#0000c0'];
    let frame = 0;
    function draw() {
      frame += 1;
      bars.forEach((colour, i) => {
        g.fillStyle = colour;
        g.fillRect(i * canvas.width / bars.length, 0, canvas.width / bars.length + 1, canvas.height);
      });
      g.fillStyle = '#000';
      g.fillRect(0, canvas.height - 70, canvas.width, 70);
      const x = (frame * 4) % (canvas.width + 60) - 30;
      g.fillStyle = '#fff';
      g.beginPath();
      g.arc(x, canvas.height / 2, 26, 0, 2 * Math.PI);
      g.fill();
      g.font = '28px sans-serif';
      g.fillText('test pattern from ' + ourId, 16, canvas.height - 38);
      g.font = '18px monospace';
      g.fillText(new Date().toISOString().slice(11, 22), 16, canvas.height - 12);
    }
    draw();
    setInterval(draw, 1000 / 30);
    return canvas.captureStream(30).getVideoTracks()[0];
  }

  async function tryUserMedia(constraints) {
    try {
      return [await navigator.mediaDevices.getUserMedia(constraints), null];
    } catch (e) {
      return [null, e];
    }
  }

  /* Camera and microphone if there are any; a test pattern if no camera. */
  async function startLocalMedia() {
    const wanted = params.get('media') || 'camera';
    const stream = new MediaStream();
    const notes = [];
    if (wanted === 'none') {
      localNote = 'Receive only (?media=none): this page sends no video or sound.';
      return stream;
    }
    let failure = null;
    if (wanted !== 'pattern') {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        failure = 'the browser gives camera access only to pages on https:// or localhost';
      } else {
        let [media, error] = await tryUserMedia({video: {width: 640, height: 480}, audio: true});
        if (!media) [media, error] = await tryUserMedia({video: {width: 640, height: 480}});
        if (!media) {
          const [audioOnly] = await tryUserMedia({audio: true});
          media = audioOnly;
        }
        if (media) media.getTracks().forEach((t) => stream.addTrack(t));
        if (!stream.getVideoTracks().length) {
          failure = error ? (error.name + (error.message ? ': ' + error.message : '')) : 'no camera found';
        }
        if (!stream.getAudioTracks().length) notes.push('No microphone: the others will not hear you.');
      }
    }
    if (!stream.getVideoTracks().length) {
      stream.addTrack(testPattern());
      notes.unshift(wanted === 'pattern'
        ? 'Sending a test pattern instead of the camera (?media=pattern).'
        : 'No camera (' + failure + '): sending a test pattern instead.');
    }
    localNote = notes.join(' ');
    return stream;
  }

  // ---------------------------------------------------------- remote peers

  /*
   * One RTCPeerConnection with one remote peer, and its video tile.
   * send(message) delivers a negotiation message (an object is sent as JSON).
   * Work is chained so that messages are handled in the order they came.
   */
  class Peer {
    constructor(uid, label, send) {
      this.uid = uid;
      this.label = label;
      this.send = send;
      this.closed = false;
      this.remoteSet = false;
      this.pendingIce = [];
      this.tracksAdded = false;
      this.chain = Promise.resolve();
      this.failure = null;
      this.remoteStream = new MediaStream();
      this.pc = new RTCPeerConnection({iceServers: iceServers});
      this.pc.onicecandidate = (event) => {
        // null (end of candidates) is not sent: the examples do not expect it.
        if (!event.candidate || !event.candidate.candidate) return;
        const ice = {candidate: event.candidate.candidate, sdpMLineIndex: event.candidate.sdpMLineIndex};
        if (event.candidate.sdpMid !== null) ice.sdpMid = event.candidate.sdpMid;
        this.send({ice: ice});
      };
      this.pc.ontrack = (event) => this.onTrack(event);
      this.pc.onconnectionstatechange = () => this.changed();
      this.pc.oniceconnectionstatechange = () => this.changed();
      this.makeTile();
      this.changed();
    }

    makeTile() {
      const tile = document.createElement('figure');
      tile.className = 'tile remote';
      tile.dataset.uid = this.uid || '';
      const video = document.createElement('video');
      video.autoplay = true;
      video.playsInline = true;
      video.className = 'remote-video';
      const caption = document.createElement('figcaption');
      const who = document.createElement('span');
      who.className = 'who';
      who.textContent = this.label;
      const state = document.createElement('span');
      state.className = 'state';
      const info = document.createElement('span');
      info.className = 'info';
      const unmute = document.createElement('button');
      unmute.type = 'button';
      unmute.className = 'unmute';
      unmute.textContent = 'Unmute';
      unmute.hidden = true;
      unmute.onclick = () => {
        video.muted = false;
        unmute.hidden = true;
      };
      caption.append(who, ' ', state, ' ', info, ' ', unmute);
      tile.append(video, caption);
      $('videos').append(tile);
      Object.assign(this, {tile: tile, video: video, stateText: state, info: info, unmute: unmute});
    }

    onTrack(event) {
      if (!this.remoteStream.getTracks().includes(event.track)) this.remoteStream.addTrack(event.track);
      if (this.video.srcObject !== this.remoteStream) {
        this.video.srcObject = this.remoteStream;
        // Without a click on the page the browser may refuse to play sound:
        // then play muted and offer a button.
        this.video.play().catch(() => {
          this.video.muted = true;
          this.unmute.hidden = false;
          this.video.play().catch((e) => log('cannot play remote media', e));
        });
      }
      this.changed();
    }

    /* The peer's state in words: negotiating, connecting, connected, ... */
    state() {
      if (this.failure) return 'failed';
      if (this.closed) return 'ended';
      const state = this.pc.connectionState;
      if (state === 'connected') return 'connected';
      if (state === 'failed') return 'failed';
      if (state === 'disconnected') return 'interrupted';
      if (!this.remoteSet && this.pc.signalingState === 'stable') return 'negotiating';
      return 'connecting';
    }

    changed() {
      const state = this.state();
      this.tile.dataset.state = state;
      this.stateText.textContent = {
        negotiating: 'negotiating\u2026',
        connecting: 'connecting\u2026',
        connected: 'connected',
        interrupted: 'connection interrupted\u2026',
        failed: 'failed' + (this.failure ? ': ' + this.failure : ' (no network path between you)'),
        ended: 'ended',
      }[state];
      onPeersChanged();
    }

    /* What the video element decodes, for the caption and for tests. */
    stats() {
      const video = this.video;
      const quality = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
      return {
        uid: this.uid,
        state: this.state(),
        connectionState: this.pc.connectionState,
        iceConnectionState: this.pc.iceConnectionState,
        videoWidth: video.videoWidth,
        videoHeight: video.videoHeight,
        frames: quality ? quality.totalVideoFrames : 0,
        tracks: this.remoteStream.getTracks().map((t) => t.kind),
      };
    }

    /* The addresses of the candidate pair in use, once connected. */
    async selectedPair() {
      const stats = await this.pc.getStats();
      let pair = null;
      stats.forEach((report) => {
        if (report.type === 'transport' && report.selectedCandidatePairId) {
          pair = stats.get(report.selectedCandidatePairId);
        }
      });
      if (!pair) return null;
      const local = stats.get(pair.localCandidateId) || {};
      const remote = stats.get(pair.remoteCandidateId) || {};
      return {
        local: local.address || local.ip,
        remote: remote.address || remote.ip,
        protocol: local.protocol,
        localType: local.candidateType,
        remoteType: remote.candidateType,
      };
    }

    refreshInfo() {
      const s = this.stats();
      if (s.videoWidth > 0) {
        this.info.textContent = s.videoWidth + '\u00d7' + s.videoHeight + ', ' + s.frames + ' frames';
      } else if (s.tracks.length && !s.tracks.includes('video')) {
        this.info.textContent = 'sound only';
      } else {
        this.info.textContent = '';
      }
    }

    enqueue(work) {
      this.chain = this.chain.then(() => (this.closed ? null : work())).catch((e) => this.fail(e));
      return this.chain;
    }

    fail(error) {
      log('peer ' + this.label + ' failed', error);
      this.failure = error && error.message ? error.message : String(error);
      this.changed();
    }

    /* Send our media; when offering, also ask for what we do not send. */
    addLocalMedia(offering) {
      if (this.tracksAdded) return;
      this.tracksAdded = true;
      for (const kind of ['audio', 'video']) {
        const track = localStream.getTracks().find((t) => t.kind === kind);
        if (track) {
          this.pc.addTrack(track, localStream);
        } else if (offering) {
          this.pc.addTransceiver(kind, {direction: 'recvonly'});
        }
      }
    }

    makeOffer() {
      return this.enqueue(async () => {
        this.addLocalMedia(true);
        await this.pc.setLocalDescription(await this.pc.createOffer());
        this.send({sdp: {type: 'offer', sdp: this.pc.localDescription.sdp}});
        this.changed();
      });
    }

    /* A negotiation message from the peer: parsed JSON, or OFFER_REQUEST. */
    receive(message) {
      if (message === 'OFFER_REQUEST') return this.makeOffer();
      if (message.sdp) return this.enqueue(() => this.onDescription(message.sdp));
      if (message.ice) return this.enqueue(() => this.onCandidate(message.ice));
      log('ignoring a message without sdp or ice', message);
      return this.chain;
    }

    async onDescription(description) {
      await this.pc.setRemoteDescription({type: description.type, sdp: description.sdp});
      this.remoteSet = true;
      if (description.type === 'offer') {
        this.addLocalMedia(false);
        await this.pc.setLocalDescription(await this.pc.createAnswer());
        this.send({sdp: {type: 'answer', sdp: this.pc.localDescription.sdp}});
      }
      const pending = this.pendingIce;
      this.pendingIce = [];
      for (const ice of pending) await this.onCandidate(ice);
      this.changed();
    }

    async onCandidate(ice) {
      if (!this.remoteSet) {
        this.pendingIce.push(ice);
        return;
      }
      const candidate = {candidate: ice.candidate || ''};
      if (ice.sdpMLineIndex !== undefined && ice.sdpMLineIndex !== null) candidate.sdpMLineIndex = ice.sdpMLineIndex;
      if (ice.sdpMid !== undefined && ice.sdpMid !== null) candidate.sdpMid = ice.sdpMid;
      if (candidate.sdpMid === undefined && candidate.sdpMLineIndex === undefined) candidate.sdpMLineIndex = 0;
      try {
        await this.pc.addIceCandidate(candidate);
      } catch (e) {
        // One unusable candidate (another address family, say) is not fatal.
        log('ignoring ICE candidate ' + JSON.stringify(ice) + ': ' + e);
      }
    }

    close() {
      if (this.closed) return;
      this.closed = true;
      this.pc.close();
      this.tile.remove();
    }
  }

  // ----------------------------------------------------------- signalling

  let ws = null;
  let registered = false;
  let registerAttempts = 0;
  let reconnectDelay = 0;
  let refused = false;
  // idle | calling | session | joining | room
  let mode = 'idle';
  let sessionPeer = null;
  let callee = null;
  let offerRequest = false;
  let expectSessionError = false;
  let roomId = null;
  const roomPeers = new Map();
  let hangingUp = false;
  let pendingAction = null;

  function send(text) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(text);
  }

  function sendInSession(message) {
    send(typeof message === 'string' ? message : JSON.stringify(message));
  }

  function roomSender(uid) {
    return (message) => send('ROOM_PEER_MSG ' + uid + ' ' +
      (typeof message === 'string' ? message : JSON.stringify(message)));
  }

  function peers() {
    if (sessionPeer) return [sessionPeer];
    return Array.from(roomPeers.values());
  }

  /* The call status follows the peers' connection states. */
  function onPeersChanged() {
    if (mode === 'session' && sessionPeer) {
      const state = sessionPeer.state();
      const who = sessionPeer.label;
      if (state === 'connected') setCallStatus('connected', 'In a call with ' + who);
      else if (state === 'failed') setCallStatus('error', 'The call with ' + who + ' failed: ' + (sessionPeer.failure || 'no network path between you'));
      else if (state === 'interrupted') setCallStatus('connecting', 'Connection to ' + who + ' interrupted, reconnecting\u2026');
      else setCallStatus('connecting', 'Connecting to ' + who + '\u2026');
    } else if (mode === 'room') {
      const all = Array.from(roomPeers.values());
      const connected = all.filter((p) => p.state() === 'connected').length;
      let text = "In room '" + roomId + "'";
      if (all.length === 0) text += ', waiting for others to join';
      else text += ': connected to ' + connected + ' of ' + all.length + (all.length === 1 ? ' member' : ' members');
      setCallStatus(connected > 0 ? 'connected' : 'connecting', text);
    }
  }

  function connect() {
    registered = false;
    setServerStatus('connecting', 'connecting\u2026');
    ws = new WebSocket(wsUrl);
    ws.onopen = () => {
      setServerStatus('registering', "registering as '" + ourId + "'\u2026");
      if (mode === 'idle' && callStatus.dataset.state === 'idle') {
        setCallStatus('registering', "Registering as '" + ourId + "'\u2026");
      }
      ws.send('HELLO ' + ourId);
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== 'string') {
        log('ignoring a binary message');
        return;
      }
      onServerMessage(event.data);
    };
    ws.onclose = (event) => onServerClose(event);
  }

  function onRegistered() {
    registered = true;
    registerAttempts = 0;
    reconnectDelay = 0;
    $('our-id').textContent = ourId;
    const link = $('call-me-link');
    link.href = location.origin + '/?call=' + encodeURIComponent(ourId);
    link.hidden = false;
    setServerStatus('registered', 'connected');
    if (pendingAction) {
      const action = pendingAction;
      pendingAction = null;
      action();
    } else if (['idle', 'registering'].includes(callStatus.dataset.state)) {
      setCallStatus('ready', "Ready: waiting for a call to '" + ourId + "'");
    }
    updateControls();
  }

  function onServerMessage(text) {
    if (!registered) {
      if (text === 'HELLO') {
        onRegistered();
      } else if (text.startsWith('ERROR')) {
        onRegistrationRefused(text.slice(6));
      }
      return;
    }
    switch (mode) {
      case 'calling':
        if (text === 'SESSION_OK') return onSessionOk();
        if (text.startsWith('ERROR')) return endCall('error', 'Cannot call ' + quoted(callee) + ': ' + text.slice(6));
        // Our callee called us first: we are the callee of its session.
        expectSessionError = true;
        mode = 'idle';
        return onIdleMessage(text);
      case 'joining':
        if (text.startsWith('ROOM_OK')) return onRoomOk(text.slice(8));
        if (text.startsWith('ERROR')) return endCall('error', 'Cannot join room ' + quoted(roomId) + ': ' + text.slice(6));
        return log('unexpected message while joining: ' + text);
      case 'room':
        return onRoomMessage(text);
      case 'session':
        if (expectSessionError && text.startsWith('ERROR')) {
          expectSessionError = false;
          return log('our own call lost the race: ' + text);
        }
        return sessionPeer.receive(parsePayload(text));
      default:
        return onIdleMessage(text);
    }
  }

  /* Registered and in no call: what arrives is the start of an incoming call. */
  function onIdleMessage(text) {
    if (text.startsWith('ERROR')) {
      setCallStatus('error', 'The server said: ' + text.slice(6));
      return;
    }
    const message = parsePayload(text);
    if (message === null) return;
    mode = 'session';
    sessionPeer = new Peer(null, 'the caller', sendInSession);
    setCallStatus('connecting', 'Incoming call, connecting\u2026');
    updateControls();
    sessionPeer.receive(message);
  }

  function parsePayload(text) {
    if (text === 'OFFER_REQUEST') return text;
    try {
      return JSON.parse(text);
    } catch (e) {
      log('ignoring a message that is not JSON: ' + text.slice(0, 80));
      return null;
    }
  }

  function quoted(value) {
    return "'" + value + "'";
  }

  function onRegistrationRefused(reason) {
    // Our own previous connection may not be gone from the server yet.
    if (/already taken/.test(reason) && registerAttempts < 10 && (ourIdWasRegistered || !chosenId)) {
      registerAttempts += 1;
      if (!ourIdWasRegistered) ourId = randomId();
      reconnectDelay = 200 * registerAttempts;
      return;
    }
    refused = true;
    setServerStatus('refused', 'refused');
    setCallStatus('error', "Cannot register as '" + ourId + "': " + reason +
      (/taken/.test(reason) ? '. Choose another id with ?id=...' : ''));
  }

  let ourIdWasRegistered = false;

  function onServerClose(event) {
    const wasRegistered = registered;
    if (registered) ourIdWasRegistered = true;
    registered = false;
    ws = null;
    const before = mode;
    const ended = ['session', 'room', 'calling', 'joining'].includes(before);
    if (before === 'session') {
      const who = sessionPeer ? sessionPeer.label : 'the peer';
      finishCall();
      setCallStatus('ended', hangingUp ? 'Call ended' : 'Call ended: ' + who + ' hung up');
    } else if (before === 'room') {
      finishCall();
      setCallStatus('ended', hangingUp ? "Left room '" + roomId + "'" : "Disconnected from room '" + roomId + "'");
    } else if (ended) {
      finishCall();
      setCallStatus('ended', before === 'calling' ? 'Call cancelled' : 'Joining cancelled');
    }
    hangingUp = false;
    updateControls();
    if (refused) return;
    if (!wasRegistered && !registerAttempts) {
      // Never got in: the server is down or unreachable.
      reconnectDelay = Math.min(Math.max(1000, reconnectDelay * 2), 10000);
      setServerStatus('offline', 'cannot reach the server, retrying in ' + reconnectDelay / 1000 + ' s');
      if (!ended && ['idle', 'registering', 'ready'].includes(callStatus.dataset.state)) {
        setCallStatus('registering', 'Cannot reach the signalling server at ' + wsUrl + ' (code ' + event.code + '), retrying\u2026');
      }
    } else {
      setServerStatus('offline', 'reconnecting\u2026');
    }
    setTimeout(connect, reconnectDelay || 100);
  }

  function finishCall() {
    for (const peer of peers()) peer.close();
    sessionPeer = null;
    roomPeers.clear();
    mode = 'idle';
    expectSessionError = false;
  }

  /* A failed request: the server keeps us registered, so the page stays usable. */
  function endCall(state, text) {
    finishCall();
    setCallStatus(state, text);
    updateControls();
  }

  // --------------------------------------------------------- 1-1 sessions

  function call(uid, askForOffer) {
    if (!registered || mode !== 'idle') return;
    mode = 'calling';
    callee = uid;
    offerRequest = askForOffer;
    setCallStatus('calling', 'Calling ' + quoted(uid) + '\u2026');
    updateControls();
    send('SESSION ' + uid);
  }

  function onSessionOk() {
    mode = 'session';
    sessionPeer = new Peer(callee, quoted(callee), sendInSession);
    updateControls();
    if (offerRequest) {
      send('OFFER_REQUEST');
      setCallStatus('connecting', 'Asked ' + quoted(callee) + ' to make the offer\u2026');
    } else {
      sessionPeer.makeOffer();
    }
  }

  // ---------------------------------------------------------------- rooms

  function joinRoom(id) {
    if (!registered || mode !== 'idle') return;
    mode = 'joining';
    roomId = id;
    setCallStatus('calling', 'Joining room ' + quoted(id) + '\u2026');
    updateControls();
    send('ROOM ' + id);
  }

  function roomPeer(uid) {
    let peer = roomPeers.get(uid);
    if (!peer) {
      peer = new Peer(uid, quoted(uid), roomSender(uid));
      roomPeers.set(uid, peer);
    }
    return peer;
  }

  function onRoomOk(members) {
    mode = 'room';
    onPeersChanged();
    // The newcomer makes the offers.
    for (const uid of members.split(' ').filter(Boolean)) roomPeer(uid).makeOffer();
    onPeersChanged();
  }

  function onRoomMessage(text) {
    const [command, uid] = text.split(' ', 2);
    if (command === 'ROOM_PEER_JOINED') {
      roomPeer(uid);
    } else if (command === 'ROOM_PEER_LEFT') {
      const peer = roomPeers.get(uid);
      if (peer) peer.close();
      roomPeers.delete(uid);
      onPeersChanged();
    } else if (command === 'ROOM_PEER_MSG') {
      const payload = text.slice(command.length + uid.length + 2);
      const message = parsePayload(payload);
      if (message !== null) roomPeer(uid).receive(message);
    } else if (command === 'ERROR') {
      // A message to a member who has just left, for example.
      log('the server said: ' + text);
    }
  }

  // -------------------------------------------------------------- hang up

  function hangUp() {
    if (mode === 'idle' || !ws) return;
    hangingUp = true;
    ws.close(1000);
  }

  // --------------------------------------------------------------- wiring

  $('call-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const uid = $('peer-id').value.trim();
    if (uid) call(uid, $('offer-request').checked);
  });
  $('room-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('room-id').value.trim();
    if (id) joinRoom(id);
  });
  $('hangup-button').addEventListener('click', hangUp);
  window.addEventListener('pagehide', () => ws && ws.close(1000));

  setInterval(() => peers().forEach((p) => p.refreshInfo()), 500);

  /* For tests and the curious: the page's state in one object. */
  window.callPage = {
    get ourId() { return ourId; },
    get registered() { return registered; },
    get mode() { return mode; },
    get callState() { return callStatus.dataset.state; },
    get callText() { return callStatus.textContent; },
    get iceServers() { return iceServers; },
    get localTracks() { return localStream ? localStream.getTracks().map((t) => t.kind) : []; },
    get localStream() { return localStream; },
    get mediaNote() { return $('media-note').textContent; },
    peers: () => peers().map((p) => p.stats()),
    selectedPairs: () => Promise.all(peers().map(async (p) => ({uid: p.uid, pair: await p.selectedPair()}))),
    call: call,
    joinRoom: joinRoom,
    hangUp: hangUp,
  };

  async function main() {
    $('our-id').textContent = ourId;
    $('server-url').textContent = wsUrl.split('?')[0];
    $('ice-servers').textContent = describeIceServers();
    $('peer-id').value = params.get('call') || '';
    $('room-id').value = params.get('room') || '';
    $('offer-request').checked = ['1', 'true', 'yes'].includes(params.get('offer_request'));
    updateControls();
    if (iceError) {
      setCallStatus('error', 'Invalid ICE server in the page address: ' + iceError);
      return;
    }
    setCallStatus('idle', 'Starting the camera\u2026');
    localStream = await startLocalMedia();
    // A video element given a stream without tracks would hold up the page's
    // load event for ever.
    if (localStream.getTracks().length) $('local-video').srcObject = localStream;
    $('local-tile').classList.toggle('empty', !localStream.getVideoTracks().length);
    showMediaNote(localNote);
    const kinds = localStream.getTracks().map((t) => t.kind);
    $('local-info').textContent = kinds.length ? 'sending ' + kinds.join(' and ') : 'receive only';
    if (params.get('call')) {
      pendingAction = () => call(params.get('call'), $('offer-request').checked);
    } else if (params.get('room')) {
      pendingAction = () => joinRoom(params.get('room'));
    }
    setCallStatus('idle', 'Connecting to the signalling server\u2026');
    connect();
  }

  main();
})();
