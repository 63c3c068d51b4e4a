"""
The Twisted server: the twistd plugin's options and service, listening and
TLS, the WebSocket layer and the protocol on it, the web pages, metrics and
logs. It imports the core and none of the tools.
"""
