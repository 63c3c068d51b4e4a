// The harness of the WHEP and WHIP browser tests (tests/test_whep_browser.py):
// two client libraries from npm, used as their READMEs show and not modified,
// and what the tests read of the page, as window.clientsPage.
//
// - @eyevinn/webrtc-player (WHEP): watch(url) plays /whep/<producer> in the
//   <video id="remote">;
// - @eyevinn/whip-web-client (WHIP): publish(url) sends the browser's (fake)
//   camera to /whip/<name>.
//
// The page wraps RTCPeerConnection only to keep a reference to each peer
// connection the libraries make, so that the tests can read its state and
// statistics (the candidate pair in use, frames sent and decoded).

import { WebRTCPlayer } from '@eyevinn/webrtc-player';
import { WHIPClient } from '@eyevinn/whip-web-client';

const NativePeerConnection = window.RTCPeerConnection;
const peerConnections = [];

window.RTCPeerConnection = class extends NativePeerConnection {
  constructor(...args) {
    super(...args);
    peerConnections.push(this);
  }
};

const page = {
  // What happened, in order: the players' events and the page's own steps.
  events: [],
  player: null,
  whip: null,
  // The WHIP client's resource (its Location) once the server answered.
  resource: null,
  // The WHIP resource's Link headers, as the client read them.
  extensions: null,
  // A failure of watch() or publish(), as text.
  failure: null,
};
window.clientsPage = page;

function note(what) {
  page.events.push(what);
  console.log(`clientsPage: ${what}`);
}

// The libraries send their requests from event handlers: a request that
// fails there (a CORS refusal, say) is a promise nobody awaits.
window.addEventListener('unhandledrejection', (event) => {
  note(`unhandled: ${event.reason}`);
});

// ICE servers for the clients: none by default. Both libraries otherwise use
// a public STUN server, which the tests' network namespace cannot reach.
function iceServers(options) {
  return options.iceServers || [];
}

page.watch = async (url, options = {}) => {
  const video = document.getElementById('remote');
  const player = new WebRTCPlayer({
    video,
    type: 'whep',
    iceServers: iceServers(options),
    debug: true,
    mediaConstraints: options.mediaConstraints,
  });
  page.player = player;
  for (const name of [
    'no-media',
    'media-recovered',
    'peer-connection-failed',
    'initial-connection-failed',
    'connect-error',
  ]) {
    player.on(name, () => note(`player: ${name}`));
  }
  try {
    // The key goes as it is into the Authorization header.
    await player.load(new URL(url), options.authKey);
    note('player: loading');
  } catch (e) {
    page.failure = String(e);
    note(`player: load failed: ${e}`);
  }
};

page.unwatch = async () => {
  await page.player.unload();
  note('player: unloaded');
};

page.publish = async (url, options = {}) => {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: 640, height: 480 },
      audio: !!options.audio,
    });
    document.getElementById('local').srcObject = stream;
    const client = new WHIPClient({
      endpoint: url,
      opts: {
        debug: true,
        iceServers: iceServers(options),
        authkey: options.authkey,
        timeout: options.timeout,
      },
    });
    page.whip = client;
    if (options.authkey) {
      // As the README shows; the client asks only with a key (an OPTIONS
      // request with it as a bearer token).
      await client.setIceServersFromEndpoint();
      note('whip: ICE servers asked of the endpoint');
    }
    await client.ingest(stream);
    note('whip: ingesting');
    page.resource = await client.getResourceUrl();
    page.extensions = await client.getResourceExtensions();
    note(`whip: resource ${page.resource}`);
  } catch (e) {
    page.failure = String(e);
    note(`whip: publish failed: ${e}`);
  }
};

page.unpublish = async () => {
  await page.whip.destroy();
  note('whip: destroyed');
};

// The remote <video>: its size and how many frames it has shown.
page.watched = () => {
  const video = document.getElementById('remote');
  const quality = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
  return {
    videoWidth: video.videoWidth,
    videoHeight: video.videoHeight,
    frames: quality ? quality.totalVideoFrames : 0,
    tracks: video.srcObject ? video.srcObject.getTracks().map((t) => t.kind) : [],
  };
};

// Each peer connection the libraries made: its states, the frames it
// decoded and sent, and the addresses of its selected candidate pair.
page.connections = async () => {
  const out = [];
  for (const pc of peerConnections) {
    const info = {
      connectionState: pc.connectionState,
      iceConnectionState: pc.iceConnectionState,
      framesDecoded: 0,
      framesEncoded: 0,
      pair: null,
    };
    if (pc.connectionState !== 'closed') {
      const stats = await pc.getStats();
      const byId = new Map();
      stats.forEach((report) => byId.set(report.id, report));
      stats.forEach((report) => {
        if (report.type === 'inbound-rtp' && report.kind === 'video') {
          info.framesDecoded += report.framesDecoded || 0;
        } else if (report.type === 'outbound-rtp' && report.kind === 'video') {
          info.framesEncoded += report.framesEncoded || 0;
        } else if (report.type === 'transport' && report.selectedCandidatePairId) {
          const pair = byId.get(report.selectedCandidatePairId);
          const local = pair && byId.get(pair.localCandidateId);
          const remote = pair && byId.get(pair.remoteCandidateId);
          if (local && remote) {
            info.pair = { local: local.address, remote: remote.address };
          }
        }
      });
    }
    out.push(info);
  }
  return out;
};

note('ready');
