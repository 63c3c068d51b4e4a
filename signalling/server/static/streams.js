/*
 * The stream viewer of the page at /: the producers this server knows
 * (GStreamer's webrtcsink, gstwebrtc-api pages, any client of the JSON
 * protocol), listed live as they come and go, each playable here as a
 * consumer; and this page's own camera (or test pattern) published as a
 * producer. Built on gstwebrtc-api (vendored, see gstwebrtc-api-NOTICE.txt),
 * which speaks the JSON protocol on the same WebSocket URL as the call page.
 * Each stream also shows its WHEP URL (https://host/whep/NAME), which any
 * WHEP player can play, with a button that copies it.
 */
(function () {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const token = (new URLSearchParams(location.search).get('token') || '').trim();
  const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/' +
    (token ? '?token=' + encodeURIComponent(token) : '');
  const producers = new Map();   // id -> {id, meta}
  const playing = new Map();     // id -> {session, video, tile, state}
  let clientId = null;
  let publishing = null;         // the ProducerSession, once started
  let api = null;

  function describeMeta(meta) {
    if (!meta || typeof meta !== 'object') return '';
    const name = meta['display-name'] || meta.name || meta.title;
    const rest = Object.entries(meta)
      .filter(([key]) => !['display-name', 'name', 'title'].includes(key))
      .map(([key, value]) => key + ': ' + (typeof value === 'string' ? value : JSON.stringify(value)));
    return [name, ...rest].filter(Boolean).join(' \u00b7 ');
  }

  /* Longest name the server takes in a WHEP path (json_wire.MAX_ID_LENGTH). */
  const MAX_NAME = 256;
  /* What the server refuses in a name (Python's str.isprintable: "Other" and
     "Separator" characters, the ASCII space excepted). */
  const UNPRINTABLE = /[\p{C}\p{Zl}\p{Zp}]|(?! )\p{Zs}/u;

  function metaName(meta) {
    return meta && typeof meta === 'object' && typeof meta.name === 'string' ? meta.name : null;
  }

  /*
   * What names a producer in its WHEP URL. The server finds a producer by
   * its id first, then by the oldest whose meta names it: so the name, when
   * the server takes it and it leads to this producer alone (no other
   * listed producer has it as its name or id), else the id.
   */
  function whepKey(producer) {
    const name = metaName(producer.meta);
    if (name === null || name === '' || name === '.' || name === '..' ||
        [...name].length > MAX_NAME || UNPRINTABLE.test(name)) {
      return producer.id;
    }
    for (const other of producers.values()) {
      if (other.id !== producer.id && (other.id === name || metaName(other.meta) === name)) {
        return producer.id;
      }
    }
    return name;
  }

  /*
   * The producer's WHEP URL, absolute, on the page's own origin; null for
   * a stream published over WHIP, which answers no offer.
   */
  function whepUrl(producer) {
    if (producer.meta && producer.meta.whip === true) return null;
    return location.origin + '/whep/' + encodeURIComponent(whepKey(producer));
  }

  /* Copy text; the Clipboard API needs a secure context, else select and copy. */
  function copyText(text, selectable) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).then(() => true, () => selectAndCopy(selectable));
    }
    return Promise.resolve(selectAndCopy(selectable));
  }

  function selectAndCopy(element) {
    const range = document.createRange();
    range.selectNodeContents(element);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try {
      return document.execCommand('copy');
    } catch (e) {
      return false;
    }
  }

  function whepLine(url) {
    const line = document.createElement('div');
    line.className = 'whep';
    const code = document.createElement('code');
    code.className = 'whep-url';
    code.textContent = url;
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'copy';
    button.textContent = 'Copy';
    button.title = 'Copy the WHEP URL';
    button.addEventListener('click', () => {
      copyText(url, code).then((copied) => {
        button.textContent = copied ? 'Copied' : 'Selected';
        button.dataset.copied = copied ? 'yes' : 'no';
      });
    });
    line.append('WHEP: ', code, ' ', button);
    return line;
  }

  function setStatus(text) {
    $('streams-status').textContent = text;
  }

  function render() {
    const list = $('producer-list');
    list.textContent = '';
    const others = [...producers.values()].filter((p) => p.id !== clientId);
    $('no-producers').hidden = others.length > 0;
    for (const producer of others) {
      const item = document.createElement('li');
      item.dataset.producerId = producer.id;
      const name = document.createElement('span');
      name.className = 'producer-name';
      name.textContent = describeMeta(producer.meta) || producer.id;
      const id = document.createElement('code');
      id.textContent = producer.id;
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = playing.has(producer.id) ? 'Stop' : 'Play';
      button.addEventListener('click', () => {
        if (playing.has(producer.id)) stop(producer.id); else play(producer.id);
      });
      item.append(name, ' ', id, ' ', button);
      const url = whepUrl(producer);
      if (url !== null) item.append(whepLine(url));
      list.append(item);
    }
  }

  function tileFor(producerId) {
    const tile = document.createElement('figure');
    tile.className = 'tile stream';
    const video = document.createElement('video');
    video.autoplay = true;
    video.playsInline = true;
    video.muted = true;
    const caption = document.createElement('figcaption');
    const producer = producers.get(producerId);
    caption.textContent = (producer && describeMeta(producer.meta)) || producerId;
    tile.append(video, caption);
    $('stream-videos').append(tile);
    return {tile, video};
  }

  function play(producerId) {
    if (!api || playing.has(producerId)) return;
    const session = api.createConsumerSession(producerId);
    if (!session) {
      setStatus('Cannot play ' + producerId);
      return;
    }
    const {tile, video} = tileFor(producerId);
    const entry = {session, video, tile, state: 'connecting', error: null};
    playing.set(producerId, entry);
    session.addEventListener('streamsChanged', () => {
      if (session.streams.length) {
        video.srcObject = session.streams[0];
        entry.state = 'playing';
      }
    });
    session.addEventListener('error', (event) => {
      entry.error = event.message || String(event.error);
      setStatus('Stream ' + producerId + ': ' + entry.error);
    });
    session.addEventListener('closed', () => stop(producerId));
    session.connect();
    render();
  }

  function stop(producerId) {
    const entry = playing.get(producerId);
    if (!entry) return;
    playing.delete(producerId);
    entry.tile.remove();
    entry.session.close();
    render();
  }

  function publish() {
    const stream = window.callPage && window.callPage.localStream;
    if (!api || publishing || !stream || !stream.getTracks().length) {
      setStatus('Nothing to publish: the page has no camera or test pattern.');
      return;
    }
    publishing = api.createProducerSession(stream);
    if (!publishing) {
      setStatus('Cannot publish.');
      return;
    }
    publishing.addEventListener('error', (event) => setStatus('Publishing: ' + (event.message || event.error)));
    publishing.addEventListener('closed', () => {
      publishing = null;
      $('publish-button').textContent = 'Publish my camera';
    });
    publishing.start();
    $('publish-button').textContent = 'Stop publishing';
  }

  function unpublish() {
    if (publishing) publishing.close();
  }

  function frames(producerId) {
    const entry = playing.get(producerId);
    if (!entry) return null;
    const video = entry.video;
    const quality = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
    return {
      state: entry.state,
      error: entry.error,
      videoWidth: video.videoWidth,
      videoHeight: video.videoHeight,
      frames: quality ? quality.totalVideoFrames : 0,
    };
  }

  function start() {
    $('whip-url').textContent = location.origin + '/whip/NAME';
    if (typeof window.GstWebRTCAPI !== 'function') {
      setStatus('gstwebrtc-api did not load.');
      return;
    }
    const iceServers = (window.callPage && window.callPage.iceServers) || [];
    const params = new URLSearchParams(location.search);
    const name = (params.get('stream_name') || '').trim() || ('page ' + Math.floor(Math.random() * 9000 + 1000));
    api = new window.GstWebRTCAPI({
      signalingServerUrl: wsUrl,
      meta: {'display-name': name},
      webrtcConfig: {iceServers: iceServers, bundlePolicy: 'max-bundle'},
    });
    api.registerConnectionListener({
      connected(id) {
        clientId = id;
        setStatus('Connected as ' + id + '.');
        for (const producer of api.getAvailableProducers()) producers.set(producer.id, producer);
        render();
      },
      disconnected() {
        clientId = null;
        producers.clear();
        setStatus('Disconnected; reconnecting\u2026');
        render();
      },
    });
    api.registerPeerListener({
      producerAdded(producer) {
        producers.set(producer.id, producer);
        render();
      },
      producerRemoved(producer) {
        producers.delete(producer.id);
        stop(producer.id);
        render();
      },
    });
    $('publish-button').addEventListener('click', () => (publishing ? unpublish() : publish()));
    render();
  }

  /* For tests and the curious. */
  window.streamsPage = {
    get clientId() { return clientId; },
    get publishing() { return publishing !== null; },
    producers: () => [...producers.values()].map((p) => ({id: p.id, meta: p.meta})),
    whepUrl: (id) => (producers.has(id) ? whepUrl(producers.get(id)) : null),
    play: play,
    stop: stop,
    publish: publish,
    frames: frames,
  };

  start();
})();
