"""
Certificates and TLS for the tests: self-signed pairs and Let's Encrypt's
layout written at run time, and real TLS exchanges with a server factory on
a loopback port.
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactor
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from signalling.server import tls
from tests.clients import TLSClient


def write_certificate(directory):
    """
    Write a self-signed certificate for ``localhost`` into ``directory``.

    :returns: a :class:`signalling.server.tls.CertificateFiles`, with ``pem``
        (the certificate's PEM bytes) added for clients to trust.
    """
    files = tls.create_self_signed(directory)
    with open(files.cert, "rb") as f:
        files.pem = f.read()
    return files


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def touch_all(directory, *names):
    os.makedirs(directory, exist_ok=True)
    for name in names:
        write_file(os.path.join(directory, name), b"")


def pem_of(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem_of(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_der(key):
    return key.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def make_certificate(subject, issuer, public_key, signing_key, ca):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def ca_certificate(name):
    """:returns: a new self-signed CA certificate called ``name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    return make_certificate(name, name, key.public_key(), key, True)


def write_lets_encrypt_layout(directory, with_cert=True, with_chain=True):
    """
    Write what Let's Encrypt's ``live/<domain>/`` holds: ``privkey.pem``,
    ``fullchain.pem`` and, unless told otherwise, ``cert.pem`` and
    ``chain.pem``, for a leaf signed by an intermediate CA.

    :returns: ``(leaf, intermediate)`` as ``cryptography`` certificates.
    """
    os.makedirs(directory, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = make_certificate("Test CA", "Test CA", ca_key.public_key(), ca_key, True)
    leaf = make_certificate("localhost", "Test CA", leaf_key.public_key(), ca_key, False)
    write_file(os.path.join(directory, "privkey.pem"), key_pem_of(leaf_key))
    write_file(os.path.join(directory, "fullchain.pem"), pem_of(leaf) + pem_of(intermediate))
    if with_cert:
        write_file(os.path.join(directory, "cert.pem"), pem_of(leaf))
    if with_chain:
        write_file(os.path.join(directory, "chain.pem"), pem_of(intermediate))
    return leaf, intermediate


def listen_on(description):
    """
    Parse ``description`` as twistd would and listen on a memory reactor.

    :returns: the ``CertificateOptions`` the TLS port was given.
    """
    reactor = MemoryReactor()
    serverFromString(reactor, description).listen(Factory())
    [(port, factory, context_factory, backlog, interface)] = reactor.sslServers
    return context_factory


class _Tracked(ProtocolWrapper):
    """Fires ``self.lost`` once the server side of a connection is closed."""

    def connectionLost(self, reason):
        ProtocolWrapper.connectionLost(self, reason)
        self.lost.callback(None)


class _TrackingFactory(WrappingFactory):
    """Wraps a server factory; ``lost`` holds one Deferred per connection."""

    protocol = _Tracked

    def __init__(self, wrappedFactory):
        super().__init__(wrappedFactory)
        self.lost = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.lost = Deferred()
        self.lost.append(protocol.lost)
        return protocol


@inlineCallbacks
def tls_exchange(server_factory, trust_pem, request=b"", alpn=None):
    """
    Listen with ``server_factory`` on a real loopback port, connect a
    :class:`TLSClient` that trusts only ``trust_pem`` and checks the name
    ``localhost`` (offering the ALPN protocols ``alpn``), and wait until both sides of the connection are closed and
    the port no longer listens.

    :returns: a Deferred firing with the :class:`TLSClient`.
    """
    tracking = _TrackingFactory(server_factory)
    port = reactor.listenTCP(0, tracking, interface="127.0.0.1")
    try:
        client = TLSClient(request)
        endpoint = wrapClientTLS(
            optionsForClientTLS(
                "localhost", trustRoot=Certificate.loadPEM(trust_pem), acceptableProtocols=alpn
            ),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        yield endpoint.connect(Factory.forProtocol(lambda: client))
        yield client.closed
        yield gatherResults(tracking.lost)
    finally:
        yield port.stopListening()
    return client


def serve_tls(server_tls):
    """
    :returns: a server factory that puts ``server_tls`` over plain TCP the
        way ``makeService`` does for a bare ``ssl:`` port.
    """
    return TLSMemoryBIOFactory(server_tls, False, Factory.forProtocol(Protocol))


