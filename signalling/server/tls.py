"""
TLS material: find the certificate and key in ``--cert-path``, create a
self-signed pair for local use when there is none, check that a pair can be
used, and serve it on a bare ``ssl:PORT`` endpoint.

A bare ``ssl:`` endpoint (one that names none of Twisted's TLS parameters)
becomes the matching ``tcp:`` endpoint with our own TLS layer on top: that way
the certificate chain is exactly what the files hold (Twisted's ``ssl:``
parser would serve a ``fullchain.pem`` leaf twice), and the context can be
replaced while the server runs. An ``ssl:`` endpoint that names its own files
is left to Twisted.
"""

import datetime
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from signalling.server.limits import REFUSED
from signalling.server.transport import TURN_WRITES, send_now

_log = Logger()

#: Host names and addresses the generated certificate is valid for.
SELF_SIGNED_NAMES = ("localhost",)
SELF_SIGNED_ADDRESSES = ("127.0.0.1", "::1")
SELF_SIGNED_DAYS = 365

#: Parameters of Twisted's ssl: endpoint that make it more than a bare port.
_TLS_PARAMETERS = re.compile(
    r"(^|:)(privateKey|certKey|extraCertChain|sslmethod|dhParameters)="
)


class TLSConfigError(Exception):
    """TLS material that cannot be used; the message is one line for the operator."""


class CertificateFiles:
    """
    Where a certificate, its key and its chain (if any) live.

    :ivar cert: path of the PEM certificate, possibly followed by its chain
        (``fullchain.pem``).
    :ivar key: path of the PEM private key.
    :ivar chain: path of further PEM certificates sent along, or None.
    """

    def __init__(self, cert, key, chain=None):
        self.cert = cert
        self.key = key
        self.chain = chain


def find_certificate(cert_dir):
    """
    Look for a certificate and key in ``cert_dir``.

    Let's Encrypt's layout (``privkey.pem`` with ``cert.pem`` and
    ``chain.pem``, or ``fullchain.pem``) comes first, then ``cert.pem`` with
    ``key.pem``.

    :returns: a :class:`CertificateFiles`, or None when the directory holds
        none of these files.
    :raises TLSConfigError: when it holds only half of a pair, which must not
        be replaced by a generated one.
    """

    def path(name):
        candidate = os.path.join(cert_dir, name)
        return candidate if os.path.exists(candidate) else None

    privkey = path("privkey.pem")
    cert, key = path("cert.pem"), path("key.pem")
    if privkey is not None:
        if cert is not None:
            return CertificateFiles(cert, privkey, path("chain.pem"))
        fullchain = path("fullchain.pem")
        if fullchain is not None:
            return CertificateFiles(fullchain, privkey)
        raise TLSConfigError(
            f"{cert_dir} has privkey.pem but neither cert.pem nor fullchain.pem"
        )
    if cert is not None and key is not None:
        return CertificateFiles(cert, key)
    partial = [n for n in ("cert.pem", "key.pem", "fullchain.pem") if path(n)]
    if partial:
        raise TLSConfigError(
            f"{cert_dir} has {' and '.join(partial)} but no complete pair "
            "(cert.pem with key.pem, or privkey.pem with cert.pem or fullchain.pem)"
        )
    return None


def create_self_signed(cert_dir, now=None):
    """
    Write a new self-signed certificate for ``localhost`` (and the loopback
    addresses) with an EC P-256 key into ``cert_dir``, creating it if needed.
    The key file is readable by its owner only.

    :param now: the issue time (a timezone-aware datetime); defaults to now.
    :returns: the :class:`CertificateFiles` written.
    :raises TLSConfigError: when the directory or files cannot be written.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SELF_SIGNED_NAMES[0])])
    alt_names = [x509.DNSName(n) for n in SELF_SIGNED_NAMES] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in SELF_SIGNED_ADDRESSES
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    files = CertificateFiles(
        os.path.join(cert_dir, "cert.pem"), os.path.join(cert_dir, "key.pem")
    )
    try:
        os.makedirs(cert_dir, exist_ok=True)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(files.cert, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise TLSConfigError(
            f"cannot write a self-signed certificate to {cert_dir}: {e.strerror}"
        ) from None
    return files


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


def load_certificate(files):
    """
    Read a certificate, its chain and its key, and check that they belong
    together.

    :returns: ``(certificate, key, chain)``: ``cryptography`` objects, the
        chain a list of the further certificates in the certificate file and
        the chain file, in order, without repeats of the leaf.
    :raises TLSConfigError: naming the file and what is wrong with it.
    """
    cert_pem = _read(files.cert, "certificate")
    key_pem = _read(files.key, "private key")
    chain_pem = _read(files.chain, "certificate chain") if files.chain else b""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSConfigError(
            f"the certificate {files.cert} is not a PEM certificate"
        ) from None
    try:
        chain = x509.load_pem_x509_certificates(chain_pem) if chain_pem else []
    except ValueError:
        raise TLSConfigError(
            f"the certificate chain {files.chain} is not a PEM certificate"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSConfigError(
            f"the private key {files.key} is not an unencrypted PEM private key"
        ) from None
    cert = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(
        der, spki
    ):
        raise TLSConfigError(
            f"the private key {files.key} does not match the certificate {files.cert}"
        )
    extra = []
    for other in certs[1:] + chain:
        if other != cert and other not in extra:
            extra.append(other)
    return cert, key, extra


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server side of TLS for a bare ``ssl:`` port: one certificate, its
    chain and key, served with Twisted's default (modern) settings.

    :param files: the :class:`CertificateFiles` to serve.
    :raises TLSConfigError: when they cannot be used.
    """

    _log = Logger()

    def __init__(self, files):
        self.files = files
        self.certificate, self._context = self._load(files)
        #: The DNS names the certificate is for (its subjectAltName), lower case.
        self.dns_names = certificate_dns_names(self.certificate)

    @staticmethod
    def _load(files):
        certificate, key, chain = load_certificate(files)
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(certificate),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain],
        )
        # Build the context now, so that a problem shows before it is used.
        return certificate, options.getContext()

    def reload(self):
        """
        Read the files again. New handshakes use the new pair; connections
        already set up keep theirs. A pair that cannot be used is refused
        with one log line, and the old one stays in use.

        :returns: True if the new pair is in use.
        """
        try:
            certificate, context = self._load(self.files)
        except TLSConfigError as e:
            self._log.error(
                "TLS certificate not reloaded, keeping the old one: {reason}",
                reason=str(e),
            )
            return False
        self.certificate, self._context = certificate, context
        self.dns_names = certificate_dns_names(certificate)
        self._log.info(
            "TLS certificate reloaded: {cert_file} (SHA-256 {fingerprint})",
            cert_file=self.files.cert,
            fingerprint=fingerprint(certificate),
        )
        return True

    def serverConnectionForTLS(self, tlsProtocol):
        """:returns: a new server-side ``OpenSSL.SSL.Connection``."""
        return SSL.Connection(self._context, None)


#: OpenSSL's words for the usual client-side failures, and ours for the log.
_TLS_FAILURES = (
    ("unknown ca", "the client does not trust the certificate (alert: unknown ca)"),
    ("bad certificate", "the client refused the certificate (alert: bad certificate)"),
    ("certificate unknown", "the client refused the certificate (alert: certificate unknown)"),
    ("certificate expired", "the client says the certificate has expired"),
    ("http request", "plain HTTP on a TLS port (use https:// or wss://)"),
    ("wrong version number", "the client does not speak TLS, or no version we accept"),
    ("unsupported protocol", "the client offers no TLS version we accept"),
    ("version too low", "the client offers no TLS version we accept"),
    ("no shared cipher", "the client offers no cipher we accept"),
    ("no application protocol", "the client offers no application protocol (ALPN) we speak"),
    ("unexpected eof", "the client closed the connection during the TLS handshake"),
)


def tls_failure_reason(error):
    """
    :param error: an ``OpenSSL.SSL.Error`` from a server connection.
    :returns: what went wrong, in plain words, for one log line.
    """
    texts = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else ():
        if isinstance(entry, tuple) and entry:
            texts.append(str(entry[-1]))
    text = "; ".join(texts) or str(error) or type(error).__name__
    lowered = text.lower()
    for marker, plain in _TLS_FAILURES:
        if marker in lowered:
            return plain
    return text


#: What a plain HTTP request on a TLS port is answered with, before closing.
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 59\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"This port speaks TLS: use https:// or wss://, not http://.\n"
)

#: First bytes of the HTTP methods a browser or curl sends.
_HTTP_METHODS = (b"GET ", b"HEAD", b"POST", b"PUT ", b"OPTI", b"DELE", b"PATC", b"CONN")


class _CountingTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS layer, with the writes of one turn of the reactor sent
    together, in one TLS record (up to :data:`TURN_WRITES`, then at once),
    when the turn ends, or, for what the connection's own input makes it
    write, once that input is handled: a room's notices and messages to one
    member, a reply and what follows it, were each a record of its own,
    with its encryption, its pass through pyOpenSSL and its 22 bytes of
    framing.
    Counts the client address, answers plain HTTP, and lets go of the
    connection by reference counting when it ends.
    """

    #: What was written in this turn and not yet handed to TLS, or None.
    _turn = None
    _turn_size = 0

    _first = True

    def makeConnection(self, transport):
        # Twisted's, without its loop that declares the transport's
        # interfaces on this protocol one at a time, each declaration
        # replacing the one before (a dozen a connection):
        # ProtocolWrapper.makeConnection then declares them all at once.
        if not self._connectWrapped:
            return TLSMemoryBIOProtocol.makeConnection(self, transport)
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        Protocol.makeConnection(self, transport)
        ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def dataReceived(self, data):
        if self._first:
            self._first = False
            # A TLS handshake starts with a record of type 22; plain HTTP
            # with a method name. Answer that in HTTP, cheaply, and close.
            if data[:4] in _HTTP_METHODS:
                quiet = getattr(self.wrappedProtocol, "quiet_close", None)
                if quiet is not None:
                    quiet()
                self.factory.plain_http(self.transport)
                return
        # What this connection's own input makes it write (a reply) goes
        # once that input is handled, without waiting for the turn's end.
        self._reading = True
        try:
            TLSMemoryBIOProtocol.dataReceived(self, data)
        finally:
            self._reading = False
            self.send_turn()

    counted_host = None
    #: True while the connection's own input is handled.
    _reading = False

    def write(self, data):
        turn = self._turn
        if turn is None:
            self._turn = [data]
            self._turn_size = len(data)
            if not self._reading:
                self.factory.send_at_end_of_turn(self)
            return
        turn.append(data)
        self._turn_size += len(data)
        if self._turn_size >= TURN_WRITES:
            self.send_turn()

    def writeSequence(self, iovec):
        self.write(b"".join(iovec))

    def send_turn(self):
        """Hand what was written in this turn to TLS, as one write."""
        turn = self._turn
        if turn is not None:
            self._turn = None
            TLSMemoryBIOProtocol.write(self, turn[0] if len(turn) == 1 else b"".join(turn))

    def _flushSendBIO(self):
        # Twisted's, with what TLS made for the peer sent at once when the
        # TCP connection holds nothing unsent (see send_now).
        try:
            data = self._tlsConnection.bio_read(2**15)
        except SSL.WantReadError:
            # Nothing to send.
            pass
        else:
            send_now(self.transport, data)

    def loseConnection(self):
        self.send_turn()
        TLSMemoryBIOProtocol.loseConnection(self)

    def unregisterProducer(self):
        # Without a producer, the TLS layer ends a closing connection.
        self.send_turn()
        TLSMemoryBIOProtocol.unregisterProducer(self)

    def abortConnection(self):
        self._turn = None
        TLSMemoryBIOProtocol.abortConnection(self)

    def _tlsShutdownFinished(self, reason):
        """
        Twisted's TLS layer ends the connection. A TLS error (an unexpected
        EOF among them) comes as a failure made inside ``_flushReceiveBIO``,
        which keeps it in a local: its traceback refers to that frame, which
        refers to the failure and to this protocol. Twisted then passes a
        different failure on, so nothing else would break that cycle before
        the garbage collector does, and every such connection would stay in
        memory until then. The traceback is never read.
        """
        if reason is not None:
            reason.cleanFailure()
        TLSMemoryBIOProtocol._tlsShutdownFinished(self, reason)

    def connectionLost(self, reason):
        self._turn = None
        if self.counted_host is not None:
            self.factory.policy.release(self.counted_host)
            self.counted_host = None
        # The peer's Finished message: in TLS 1.3 the server sends its own
        # before the client has checked the certificate.
        if self.getHandle().get_peer_finished() is None:
            self.factory.handshake_failed()
        super().connectionLost(reason)


class ServerTLSFactory(TLSMemoryBIOFactory):
    """
    The TLS layer of a bare ``ssl:`` port, counting connections that close
    before their handshake completed.

    :param server_tls: the :class:`ServerTLS`.
    :param wrapped_factory: the factory of the protocol inside TLS.
    :param stats: a :class:`signalling.server.metrics.Stats` to count into, or None.
    :param policy: the :class:`signalling.server.policy.HandshakePolicy`
        whose per-address count this layer keeps (the port's outermost), or
        None: no count.
    :param clock: the ``IReactorTime`` whose next turn sends the writes of
        this one (see :class:`_CountingTLSProtocol`); the global reactor
        when None.
    """

    protocol = _CountingTLSProtocol
    noisy = False

    def __init__(self, server_tls, wrapped_factory, stats=None, policy=None, clock=None):
        super().__init__(server_tls, False, wrapped_factory, clock)
        self._stats = stats
        self.policy = policy
        #: Connections written to in this turn, and the call that sends
        #: what they were given when it ends (one for all of them).
        self._written = []
        self._send_call = None

    def send_at_end_of_turn(self, protocol):
        """``protocol`` holds writes of this turn: send them when it ends."""
        self._written.append(protocol)
        if self._send_call is None:
            self._send_call = self._clock.callLater(0, self._send_turn)

    def _send_turn(self):
        self._send_call = None
        written, self._written = self._written, []
        for protocol in written:
            protocol.send_turn()

    def buildProtocol(self, addr):
        """
        A TLS protocol for a new connection, unless its client address holds
        as many connections as it may: then None, before any handshake.
        """
        host = None
        if self.policy is not None:
            host = self.policy.admit_address(addr)
            if host is REFUSED:
                return None
        proto = TLSMemoryBIOFactory.buildProtocol(self, addr)
        proto.counted_host = host
        return proto

    def handshake_failed(self):
        if self._stats is not None:
            self._stats.tls_handshake_failures += 1

    def plain_http(self, transport):
        """
        Answer a plain HTTP request on this TLS port with a 400 that says to
        use TLS, and close (what a TLS error would otherwise leave as an
        empty reply).
        """
        peer = transport.getPeer()
        _log.info(
            "TLS with {peer_addr} failed: {reason}; answered with 400",
            peer_addr=f"{peer.type.lower()}:{peer.host}:{peer.port}"
            if hasattr(peer, "host")
            else str(peer),
            reason="plain HTTP on a TLS port",
        )
        transport.write(PLAIN_HTTP_ANSWER)
        transport.loseConnection()


def certificate_dns_names(cert):
    """
    :returns: the DNS names of a certificate's subjectAltName, lower case
        (a wildcard such as ``*.example.org`` as it is).
    """
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(name.lower().rstrip(".") for name in names.get_values_for_type(x509.DNSName))


def fingerprint(cert):
    """:returns: the SHA-256 fingerprint of ``cert`` as colon-separated hex."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def names_tls_files(description):
    """:returns: True if an ``ssl:`` description names its own TLS settings."""
    return _TLS_PARAMETERS.search(description) is not None


_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def is_bare_ssl(description):
    """
    :returns: True for an ``ssl:`` description that names no TLS settings:
        none of Twisted's TLS parameters, and no positional argument after
        the port (which Twisted's ``ssl:`` takes as the private key file).
    """
    if not description.startswith("ssl:") or names_tls_files(description):
        return False
    arguments = _UNESCAPED_COLON.split(description)[2:]
    return all("=" in argument for argument in arguments)


def server_tls(cert_dir, create_dir=True):
    """
    The TLS layer for bare ``ssl:`` ports: the pair found in ``cert_dir``, or
    a self-signed pair created there on first use (logged with its path and
    fingerprint, and how to trust it).

    :param create_dir: whether a missing ``cert_dir`` may be created (with
        a self-signed pair); when False, a missing one is an error, for a
        mistyped path must not quietly get a certificate of its own.
    :returns: a :class:`ServerTLS`.
    :raises TLSConfigError: when no usable pair can be found or made.
    """
    if not create_dir and not os.path.isdir(cert_dir):
        raise TLSConfigError(
            f"--cert-path {cert_dir} does not exist: create it and put cert.pem and "
            "key.pem (or Let's Encrypt's files) there, or add --create-cert-path "
            "to create it with a self-signed certificate"
        )
    files = find_certificate(cert_dir)
    if files is None:
        files = create_self_signed(cert_dir)
        tls = ServerTLS(files)
        _log.warn(
            "created a self-signed certificate for localhost: {cert_file} "
            "(SHA-256 {fingerprint}). Clients must be told to trust it, e.g. "
            "signalling-client --ca-file {cert_file}; for public use put a real "
            "certificate in {cert_dir}.",
            cert_file=files.cert,
            key_file=files.key,
            cert_dir=cert_dir,
            fingerprint=fingerprint(tls.certificate),
        )
    else:
        tls = ServerTLS(files)
        _log.info(
            "TLS certificate {cert_file} (SHA-256 {fingerprint})",
            cert_file=files.cert,
            fingerprint=fingerprint(tls.certificate),
        )
    return tls


def tcp_description(description):
    """:returns: the ``tcp:`` description under a bare ``ssl:`` one."""
    return "tcp:" + description[len("ssl:"):]
