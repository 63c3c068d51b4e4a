"""
The client-side tools: ``signalling-client``, ``signalling-peer`` and
``signalling-bench``. They share the protocol's words with the server
(``signalling.core.words``); the server imports none of them.
"""
