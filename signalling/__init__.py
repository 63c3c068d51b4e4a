"""A WebRTC signalling server for GStreamer webrtcbin applications and browsers."""

__version__ = "0.1.0"
