"""
TLS material: find the certificate and key in ``--cert-path``, create a
self-signed pair for local use when there is none, check that a pair can be
used, and turn a bare ``ssl:PORT`` endpoint into one that names its files.
"""

import datetime
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger

_log = Logger()

#: Host names and addresses the generated certificate is valid for.
SELF_SIGNED_NAMES = ("localhost",)
SELF_SIGNED_ADDRESSES = ("127.0.0.1", "::1")
SELF_SIGNED_DAYS = 365

_NAMES_TLS_FILES = re.compile(r"(^|:)(privateKey|certKey)=")


class TLSConfigError(Exception):
    """TLS material that cannot be used; the message is one line for the operator."""


class CertificateFiles:
    """
    Where a certificate, its key and its chain (if any) live.

    :ivar cert: path of the PEM certificate (the first one in the file is used).
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
            # Twisted serves the first certificate of certKey; the chain file
            # then repeats it, which clients accept.
            return CertificateFiles(fullchain, privkey, fullchain)
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
    Check that a certificate and key can be read and belong together.

    :returns: the certificate (a ``cryptography`` ``x509.Certificate``).
    :raises TLSConfigError: naming the file and what is wrong with it.
    """
    cert_pem = _read(files.cert, "certificate")
    key_pem = _read(files.key, "private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TLSConfigError(
            f"the certificate {files.cert} is not a PEM certificate"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSConfigError(
            f"the private key {files.key} is not an unencrypted PEM private key"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(
        der, spki
    ):
        raise TLSConfigError(
            f"the private key {files.key} does not match the certificate {files.cert}"
        )
    return cert


def fingerprint(cert):
    """:returns: the SHA-256 fingerprint of ``cert`` as colon-separated hex."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def names_tls_files(description):
    """:returns: True if an endpoint description names its own key or certificate."""
    return _NAMES_TLS_FILES.search(description) is not None


def complete_endpoint(description, cert_dir):
    """
    Fill in the TLS files of a bare ``ssl:`` endpoint from ``cert_dir``.

    An ``ssl:`` description that names no ``privateKey=`` or ``certKey=``
    gets the pair found in ``cert_dir``, or a self-signed pair created there
    on first use (logged with its path and fingerprint). Other descriptions
    are returned unchanged.

    :returns: the endpoint description to listen on.
    :raises TLSConfigError: when no usable pair can be found or made.
    """
    if not description.startswith("ssl:") or names_tls_files(description):
        return description
    files = find_certificate(cert_dir)
    if files is None:
        files = create_self_signed(cert_dir)
        cert = load_certificate(files)
        _log.warn(
            "created a self-signed certificate for localhost: {cert_file} "
            "(SHA-256 {fingerprint}). Clients must be told to trust it, e.g. "
            "signalling-client --ca-file {cert_file}; for public use put a real "
            "certificate in {cert_dir}.",
            cert_file=files.cert,
            key_file=files.key,
            cert_dir=cert_dir,
            fingerprint=fingerprint(cert),
        )
    else:
        cert = load_certificate(files)
        _log.info(
            "TLS certificate {cert_file} (SHA-256 {fingerprint})",
            cert_file=files.cert,
            fingerprint=fingerprint(cert),
        )
    description += ":privateKey=" + quoteStringArgument(files.key)
    description += ":certKey=" + quoteStringArgument(files.cert)
    if files.chain is not None:
        description += ":extraCertChain=" + quoteStringArgument(files.chain)
    return description
