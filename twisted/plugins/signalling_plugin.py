"""The twistd plugin: ``twistd -n signalling``."""

from twisted.application.service import ServiceMaker

signalling = ServiceMaker(
    "WebRTC signalling server",
    "signalling.server.tap",
    "A WebRTC signalling server for GStreamer webrtcbin and browsers.",
    "signalling",
)
