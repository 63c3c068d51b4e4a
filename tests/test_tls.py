"""
Tests for signalling.server.tls: finding the certificate and key in ``--cert-path``,
creating a self-signed pair, checking a pair and its chain, serving it with
our own TLS layer (checked through real handshakes on loopback ports), and
telling a bare ``ssl:`` endpoint description from one that names its files.
"""

import datetime
import hashlib
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from signalling.server import tls
from tests.certificates import ca_certificate, listen_on, pem_of, public_der, read_file, serve_tls, tls_exchange, touch_all, write_certificate, write_file, write_lets_encrypt_layout


class FindCertificateTests(unittest.SynchronousTestCase):
    """Which files of a certificate directory are used."""

    def setUp(self):
        self.cert_dir = self.mktemp()
        os.makedirs(self.cert_dir)

    def path(self, name):
        return os.path.join(self.cert_dir, name)

    def test_cert_pem_and_key_pem_are_found(self):
        """``cert.pem`` with ``key.pem`` is a pair without a chain."""
        touch_all(self.cert_dir, "cert.pem", "key.pem")
        files = tls.find_certificate(self.cert_dir)
        self.assertEqual(
            (files.cert, files.key, files.chain),
            (self.path("cert.pem"), self.path("key.pem"), None),
        )

    def test_lets_encrypt_layout_uses_cert_privkey_and_chain(self):
        """
        In Let's Encrypt's layout the leaf is ``cert.pem``, the key
        ``privkey.pem`` and the chain ``chain.pem``, even though
        ``fullchain.pem`` is there too.
        """
        touch_all(
            self.cert_dir, "privkey.pem", "cert.pem", "chain.pem", "fullchain.pem"
        )
        files = tls.find_certificate(self.cert_dir)
        self.assertEqual(
            (files.cert, files.key, files.chain),
            (self.path("cert.pem"), self.path("privkey.pem"), self.path("chain.pem")),
        )

    def test_lets_encrypt_layout_without_chain_pem_has_no_chain(self):
        """``privkey.pem`` with ``cert.pem`` alone is a pair without a chain."""
        touch_all(self.cert_dir, "privkey.pem", "cert.pem")
        files = tls.find_certificate(self.cert_dir)
        self.assertEqual(
            (files.cert, files.key, files.chain),
            (self.path("cert.pem"), self.path("privkey.pem"), None),
        )

    def test_privkey_with_fullchain_only_uses_fullchain_as_the_certificate(self):
        """
        With only ``privkey.pem`` and ``fullchain.pem``, the certificate is
        read from ``fullchain.pem`` (whose first certificate is the leaf and
        the rest its chain); no chain file is named, so that the leaf is not
        read a second time as part of its own chain.
        """
        touch_all(self.cert_dir, "privkey.pem", "fullchain.pem")
        files = tls.find_certificate(self.cert_dir)
        self.assertEqual(
            (files.cert, files.key, files.chain),
            (self.path("fullchain.pem"), self.path("privkey.pem"), None),
        )

    def test_lets_encrypt_files_come_before_cert_and_key_pem(self):
        """When both layouts are present, Let's Encrypt's ``privkey.pem`` wins."""
        touch_all(self.cert_dir, "privkey.pem", "cert.pem", "key.pem")
        files = tls.find_certificate(self.cert_dir)
        self.assertEqual(files.key, self.path("privkey.pem"))

    def test_half_a_pair_is_an_error_naming_what_is_there(self):
        """
        A directory holding only part of a pair is a one-line TLSConfigError
        naming the file found, never "no pair" (which would make a new one).
        """
        for name in ("cert.pem", "key.pem", "privkey.pem", "fullchain.pem"):
            cert_dir = os.path.join(self.cert_dir, name + ".only")
            touch_all(cert_dir, name)
            e = self.assertRaises(tls.TLSConfigError, tls.find_certificate, cert_dir)
            self.assertIn(name, str(e))
            self.assertIn(cert_dir, str(e))
            self.assertNotIn("\n", str(e))

    def test_empty_directory_has_no_pair(self):
        """An empty directory yields None."""
        self.assertIsNone(tls.find_certificate(self.cert_dir))

    def test_missing_directory_has_no_pair(self):
        """A directory that does not exist yields None and is not created."""
        missing = self.path("missing")
        self.assertIsNone(tls.find_certificate(missing))
        self.assertFalse(os.path.exists(missing))


class CreateSelfSignedTests(unittest.SynchronousTestCase):
    """The self-signed certificate made on first start."""

    def setUp(self):
        self.cert_dir = os.path.join(self.mktemp(), "nested", "certs")
        self.now = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        self.files = tls.create_self_signed(self.cert_dir, now=self.now)
        self.cert = x509.load_pem_x509_certificate(read_file(self.files.cert))

    def test_files_are_cert_pem_and_key_pem_in_a_created_directory(self):
        """The pair is written as cert.pem and key.pem, creating the directory."""
        self.assertEqual(
            (self.files.cert, self.files.key, self.files.chain),
            (
                os.path.join(self.cert_dir, "cert.pem"),
                os.path.join(self.cert_dir, "key.pem"),
                None,
            ),
        )
        self.assertTrue(os.path.isfile(self.files.cert))
        self.assertTrue(os.path.isfile(self.files.key))

    def test_certificate_names_localhost_and_the_loopback_addresses(self):
        """The subject alternative names are localhost, 127.0.0.1 and ::1."""
        san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_certificate_is_valid_from_now_for_a_while(self):
        """The certificate is valid at the given time and for days after it."""
        self.assertLessEqual(self.cert.not_valid_before_utc, self.now)
        self.assertGreater(
            self.cert.not_valid_after_utc, self.now + datetime.timedelta(days=30)
        )

    def test_certificate_is_not_a_ca(self):
        """The generated certificate cannot sign other certificates."""
        constraints = self.cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        )
        self.assertFalse(constraints.value.ca)

    def test_key_file_is_readable_by_its_owner_only(self):
        """key.pem has mode 0600."""
        self.assertEqual(os.stat(self.files.key).st_mode & 0o777, 0o600)

    def test_key_file_is_private_even_with_a_permissive_umask(self):
        """key.pem has mode 0600 even when the umask would allow more."""
        old = os.umask(0)
        try:
            files = tls.create_self_signed(self.mktemp())
        finally:
            os.umask(old)
        self.assertEqual(os.stat(files.key).st_mode & 0o777, 0o600)

    def test_pair_loads_and_matches(self):
        """
        load_certificate accepts the pair and returns the written certificate,
        its key and an empty chain.
        """
        cert, key, chain = tls.load_certificate(self.files)
        self.assertEqual(cert, self.cert)
        self.assertEqual(public_der(key), public_der(self.cert))
        self.assertEqual(chain, [])

    def test_our_tls_layer_accepts_the_pair(self):
        """ServerTLS takes the files as written and serves that certificate."""
        server_tls = tls.ServerTLS(self.files)
        self.assertEqual(server_tls.certificate, self.cert)
        connection = server_tls.serverConnectionForTLS(None)
        self.assertEqual(connection.get_certificate().to_cryptography(), self.cert)

    def test_twisted_can_serve_the_pair(self):
        """Twisted's ssl: endpoint parser accepts the files as written."""
        context_factory = listen_on(
            "ssl:0:privateKey={}:certKey={}".format(
                quoteStringArgument(self.files.key),
                quoteStringArgument(self.files.cert),
            )
        )
        self.assertEqual(context_factory.certificate.to_cryptography(), self.cert)

    def test_each_call_makes_a_new_key(self):
        """Two generated certificates have different keys and fingerprints."""
        other = tls.create_self_signed(self.mktemp())
        other_cert, other_key, _ = tls.load_certificate(other)
        self.assertNotEqual(tls.fingerprint(other_cert), tls.fingerprint(self.cert))
        self.assertNotEqual(public_der(other_key), public_der(self.cert))

    def test_unwritable_directory_is_a_one_line_error(self):
        """A cert dir that cannot be created raises TLSConfigError naming it."""
        blocker = self.mktemp()
        write_file(blocker, b"a file, not a directory")
        cert_dir = os.path.join(blocker, "certs")
        e = self.assertRaises(tls.TLSConfigError, tls.create_self_signed, cert_dir)
        self.assertIn(cert_dir, str(e))
        self.assertNotIn("\n", str(e))


class FingerprintTests(unittest.SynchronousTestCase):
    """The fingerprint shown to operators."""

    def test_fingerprint_is_upper_case_colon_separated_sha256_of_the_der(self):
        """32 bytes of SHA-256 over the DER encoding, as AB:CD:... upper-case hex."""
        files = write_certificate(self.mktemp())
        cert = x509.load_pem_x509_certificate(files.pem)
        fingerprint = tls.fingerprint(cert)
        self.assertRegex(fingerprint, r"\A([0-9A-F]{2}:){31}[0-9A-F]{2}\Z")
        digest = hashlib.sha256(
            cert.public_bytes(serialization.Encoding.DER)
        ).hexdigest()
        self.assertEqual(fingerprint.replace(":", "").lower(), digest)


class RefusalTestsMixin:
    """
    What ``self.load`` (load_certificate, or ServerTLS built on it) refuses,
    and how it says so.
    """

    load = None

    def setUp(self):
        self.files = write_certificate(self.mktemp())

    def assertConfigError(self, files, *fragments):
        """
        Assert that loading ``files`` raises TLSConfigError with a one-line
        message containing every fragment.
        """
        e = self.assertRaises(tls.TLSConfigError, self.load, files)
        message = str(e)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_missing_certificate_file_is_named(self):
        """A certificate file that does not exist is named in the error."""
        missing = self.files.cert + ".missing"
        self.assertConfigError(
            tls.CertificateFiles(missing, self.files.key), "certificate", missing
        )

    def test_missing_key_file_is_named(self):
        """A key file that does not exist is named in the error."""
        missing = self.files.key + ".missing"
        self.assertConfigError(
            tls.CertificateFiles(self.files.cert, missing), "key", missing
        )

    def test_missing_chain_file_is_named(self):
        """A chain file that does not exist is named in the error."""
        missing = self.files.cert + ".chain"
        self.assertConfigError(
            tls.CertificateFiles(self.files.cert, self.files.key, missing),
            "chain",
            missing,
        )

    def test_unreadable_certificate_file_is_named(self):
        """
        A certificate path that cannot be read (here a directory, which even
        root cannot read as a file) is named in the error.
        """
        unreadable = self.mktemp()
        os.makedirs(unreadable)
        self.assertConfigError(
            tls.CertificateFiles(unreadable, self.files.key), "certificate", unreadable
        )

    def test_certificate_that_is_not_pem_is_refused(self):
        """A certificate file without a PEM certificate is refused."""
        write_file(self.files.cert, b"this is not a certificate\n")
        self.assertConfigError(self.files, "not a PEM certificate", self.files.cert)

    def test_empty_certificate_file_is_refused(self):
        """An empty certificate file is refused, naming it."""
        write_file(self.files.cert, b"")
        self.assertConfigError(self.files, "not a PEM certificate", self.files.cert)

    def test_certificate_file_holding_a_key_is_refused(self):
        """A key where the certificate should be is not taken for a certificate."""
        self.assertConfigError(
            tls.CertificateFiles(self.files.key, self.files.key),
            "not a PEM certificate",
            self.files.key,
        )

    def test_chain_that_is_not_pem_is_refused(self):
        """A chain file without PEM certificates is refused, naming it."""
        chain = self.files.cert + ".chain"
        write_file(chain, b"\x30\x82 DER or junk, not PEM")
        self.assertConfigError(
            tls.CertificateFiles(self.files.cert, self.files.key, chain),
            "chain",
            "not a PEM certificate",
            chain,
        )

    def test_key_that_is_not_pem_is_refused(self):
        """A key file without a PEM private key is refused."""
        write_file(self.files.key, b"\x00\x01 binary junk")
        self.assertConfigError(self.files, "private key", self.files.key)

    def test_encrypted_key_is_refused(self):
        """A passphrase-protected key cannot be used unattended, and says so."""
        key = serialization.load_pem_private_key(read_file(self.files.key), password=None)
        write_file(
            self.files.key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        self.assertConfigError(self.files, "unencrypted", self.files.key)

    def test_key_that_does_not_match_the_certificate_is_refused(self):
        """A valid key of another certificate is refused, naming both files."""
        other = write_certificate(self.mktemp())
        self.assertConfigError(
            tls.CertificateFiles(self.files.cert, other.key),
            "does not match",
            self.files.cert,
            other.key,
        )


class LoadCertificateRefusalTests(RefusalTestsMixin, unittest.SynchronousTestCase):
    """What load_certificate refuses."""

    load = staticmethod(tls.load_certificate)


class ServerTLSRefusalTests(RefusalTestsMixin, unittest.SynchronousTestCase):
    """ServerTLS refuses what load_certificate refuses, in the same words."""

    load = tls.ServerTLS


class LoadCertificateChainTests(unittest.SynchronousTestCase):
    """The chain load_certificate returns: what follows the leaf, once each."""

    def setUp(self):
        self.cert_dir = self.mktemp()

    def path(self, name):
        return os.path.join(self.cert_dir, name)

    def test_lets_encrypt_cert_and_chain(self):
        """cert.pem with chain.pem gives the leaf and chain.pem's certificate."""
        leaf, intermediate = write_lets_encrypt_layout(self.cert_dir)
        cert, key, chain = tls.load_certificate(tls.find_certificate(self.cert_dir))
        self.assertEqual((cert, chain), (leaf, [intermediate]))
        self.assertEqual(public_der(key), public_der(leaf))

    def test_fullchain_alone_gives_the_leaf_once_and_its_chain(self):
        """
        fullchain.pem alone gives its first certificate as the leaf and the
        rest as the chain, without the leaf.
        """
        leaf, intermediate = write_lets_encrypt_layout(
            self.cert_dir, with_cert=False, with_chain=False
        )
        cert, _, chain = tls.load_certificate(tls.find_certificate(self.cert_dir))
        self.assertEqual((cert, chain), (leaf, [intermediate]))

    def test_chain_file_repeating_the_leaf_does_not_repeat_it(self):
        """
        A chain file that holds the leaf again (fullchain.pem named as the
        chain) contributes only the certificates after it, and each once.
        """
        leaf, intermediate = write_lets_encrypt_layout(self.cert_dir)
        files = tls.CertificateFiles(
            self.path("fullchain.pem"),
            self.path("privkey.pem"),
            self.path("fullchain.pem"),
        )
        cert, _, chain = tls.load_certificate(files)
        self.assertEqual((cert, chain), (leaf, [intermediate]))

    def test_chain_keeps_the_files_order_without_duplicates(self):
        """
        The chain is the rest of the certificate file, then the chain file,
        in order, each certificate once.
        """
        leaf, intermediate = write_lets_encrypt_layout(self.cert_dir)
        first, second = ca_certificate("First"), ca_certificate("Second")
        write_file(
            self.path("cert.pem"), pem_of(leaf) + pem_of(first) + pem_of(intermediate)
        )
        write_file(
            self.path("chain.pem"),
            pem_of(intermediate) + pem_of(second) + pem_of(leaf) + pem_of(second),
        )
        cert, _, chain = tls.load_certificate(tls.find_certificate(self.cert_dir))
        self.assertEqual(cert, leaf)
        self.assertEqual(chain, [first, intermediate, second])


class ServerTLSTests(unittest.TestCase):
    """
    What ServerTLS serves, seen by a real TLS client through a real
    handshake on a loopback port.
    """

    def setUp(self):
        self.cert_dir = self.mktemp()

    def test_provides_the_server_connection_creator_interface(self):
        """ServerTLS is what TLSMemoryBIOFactory takes for a server."""
        files = write_certificate(self.cert_dir)
        server_tls = tls.ServerTLS(files)
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, server_tls))

    def test_each_connection_gets_its_own_tls_connection(self):
        """serverConnectionForTLS makes a new OpenSSL connection every time."""
        server_tls = tls.ServerTLS(write_certificate(self.cert_dir))
        first = server_tls.serverConnectionForTLS(None)
        second = server_tls.serverConnectionForTLS(None)
        self.assertIsInstance(first, SSL.Connection)
        self.assertIsInstance(second, SSL.Connection)
        self.assertIsNot(first, second)

    @inlineCallbacks
    def test_serves_a_pair_without_chain_as_the_certificate_alone(self):
        """
        A client trusting the certificate completes the handshake and is
        sent that certificate alone.
        """
        files = write_certificate(self.cert_dir)
        client = yield tls_exchange(serve_tls(tls.ServerTLS(files)), files.pem)
        self.assertEqual(client.chain, [x509.load_pem_x509_certificate(files.pem)])

    @inlineCallbacks
    def test_client_trusting_another_certificate_fails_the_handshake(self):
        """
        The handshake really checks what is served: a client that trusts
        only some other certificate never completes it.
        """
        files = write_certificate(self.cert_dir)
        other = write_certificate(self.mktemp())
        client = yield tls_exchange(serve_tls(tls.ServerTLS(files)), other.pem)
        self.assertIsNone(client.chain)
        self.assertTrue(client.reason.check(SSL.Error), client.reason)

    @inlineCallbacks
    def test_lets_encrypt_layout_serves_leaf_and_chain(self):
        """With Let's Encrypt's files the leaf is served with chain.pem after it."""
        leaf, intermediate = write_lets_encrypt_layout(self.cert_dir)
        server_tls = tls.ServerTLS(tls.find_certificate(self.cert_dir))
        client = yield tls_exchange(serve_tls(server_tls), pem_of(intermediate))
        self.assertEqual(client.chain, [leaf, intermediate])

    @inlineCallbacks
    def test_fullchain_only_serves_the_leaf_once_followed_by_its_chain(self):
        """
        With only privkey.pem and fullchain.pem, the leaf is served once and
        the rest of fullchain.pem follows it: the chain must not repeat the
        leaf (TLS 1.2 requires each certificate to certify the one before).
        """
        leaf, intermediate = write_lets_encrypt_layout(
            self.cert_dir, with_cert=False, with_chain=False
        )
        server_tls = tls.ServerTLS(tls.find_certificate(self.cert_dir))
        client = yield tls_exchange(serve_tls(server_tls), pem_of(intermediate))
        self.assertEqual(client.chain, [leaf, intermediate])


class ServerTLSForCertDirTests(unittest.SynchronousTestCase):
    """
    server_tls: the TLS layer of bare ssl: ports, from the pair in the cert
    dir or a self-signed pair created there.
    """

    def setUp(self):
        self.cert_dir = self.mktemp()

    def test_empty_cert_dir_gets_a_new_pair_that_is_served(self):
        """
        In an empty (here missing) cert dir, a new cert.pem and key.pem are
        created and served.
        """
        server_tls = tls.server_tls(self.cert_dir)
        cert = os.path.join(self.cert_dir, "cert.pem")
        key = os.path.join(self.cert_dir, "key.pem")
        self.assertEqual((server_tls.files.cert, server_tls.files.key), (cert, key))
        self.assertTrue(os.path.isfile(key))
        self.assertEqual(
            server_tls.serverConnectionForTLS(None).get_certificate().to_cryptography(),
            x509.load_pem_x509_certificate(read_file(cert)),
        )

    def test_existing_pair_is_served(self):
        """The cert.pem/key.pem pair in the cert dir is the one served."""
        files = write_certificate(self.cert_dir)
        server_tls = tls.server_tls(self.cert_dir)
        self.assertEqual(
            server_tls.serverConnectionForTLS(None).get_certificate().to_cryptography(),
            x509.load_pem_x509_certificate(files.pem),
        )

    def test_existing_pair_is_used_and_left_alone(self):
        """An existing cert.pem/key.pem pair is used, not replaced."""
        files = write_certificate(self.cert_dir)
        key_before = read_file(files.key)
        tls.server_tls(self.cert_dir)
        self.assertEqual(read_file(files.cert), files.pem)
        self.assertEqual(read_file(files.key), key_before)
        self.assertEqual(sorted(os.listdir(self.cert_dir)), ["cert.pem", "key.pem"])

    def test_paths_with_colons_spaces_and_backslashes_are_served(self):
        """A cert dir named with ':', ' ', '\\' and '=' still serves its files."""
        self.cert_dir = os.path.join(self.mktemp(), "odd: dir\\with=signs")
        files = write_certificate(self.cert_dir)
        server_tls = tls.server_tls(self.cert_dir)
        self.assertEqual(server_tls.files.cert, files.cert)
        self.assertEqual(
            server_tls.serverConnectionForTLS(None).get_certificate().to_cryptography(),
            x509.load_pem_x509_certificate(files.pem),
        )

    def test_lets_encrypt_layout_is_used(self):
        """With Let's Encrypt's files, cert.pem, privkey.pem and chain.pem are used."""
        leaf, _ = write_lets_encrypt_layout(self.cert_dir)
        server_tls = tls.server_tls(self.cert_dir)
        self.assertEqual(
            (server_tls.files.cert, server_tls.files.key, server_tls.files.chain),
            tuple(
                os.path.join(self.cert_dir, n)
                for n in ("cert.pem", "privkey.pem", "chain.pem")
            ),
        )
        self.assertEqual(server_tls.certificate, leaf)

    def test_creation_is_logged_with_path_and_fingerprint(self):
        """
        Creating the pair logs one warning with the certificate's path and
        SHA-256 fingerprint, so the operator can tell clients to trust it.
        """
        with capturedLogs() as events:
            tls.server_tls(self.cert_dir)
        cert_file = os.path.join(self.cert_dir, "cert.pem")
        cert = x509.load_pem_x509_certificate(read_file(cert_file))
        created = [e for e in events if e.get("log_namespace") == "signalling.server.tls"]
        self.assertEqual(len(created), 1, created)
        [event] = created
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["cert_file"], cert_file)
        self.assertEqual(event["fingerprint"], tls.fingerprint(cert))
        self.assertIn("{cert_file}", event["log_format"])
        self.assertIn("{fingerprint}", event["log_format"])

    def test_using_an_existing_pair_logs_its_fingerprint(self):
        """Using an existing pair logs (at info) its path and fingerprint."""
        files = write_certificate(self.cert_dir)
        with capturedLogs() as events:
            tls.server_tls(self.cert_dir)
        used = [e for e in events if e.get("log_namespace") == "signalling.server.tls"]
        self.assertEqual(len(used), 1, used)
        [event] = used
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["cert_file"], files.cert)
        self.assertEqual(
            event["fingerprint"],
            tls.fingerprint(x509.load_pem_x509_certificate(files.pem)),
        )
        self.assertIn("{fingerprint}", event["log_format"])

    def test_mismatched_pair_is_a_config_error(self):
        """A cert dir whose key.pem belongs to another certificate is refused."""
        files = write_certificate(self.cert_dir)
        other = write_certificate(self.mktemp())
        write_file(files.key, read_file(other.key))
        e = self.assertRaises(tls.TLSConfigError, tls.server_tls, self.cert_dir)
        self.assertIn("does not match", str(e))

    def test_lone_certificate_is_an_error_and_is_not_overwritten(self):
        """
        A cert dir holding cert.pem without its key is a configuration error
        naming the missing key.pem; the operator's certificate is not
        replaced by a self-signed one.
        """
        files = write_certificate(self.cert_dir)
        os.remove(files.key)
        e = self.assertRaises(tls.TLSConfigError, tls.server_tls, self.cert_dir)
        self.assertIn("key.pem", str(e))
        self.assertEqual(read_file(files.cert), files.pem)
        self.assertFalse(os.path.exists(files.key))

    def test_lone_key_is_an_error_and_is_not_overwritten(self):
        """
        A cert dir holding key.pem without its certificate is a configuration
        error naming the missing cert.pem; the operator's key is not replaced.
        """
        files = write_certificate(self.cert_dir)
        key = read_file(files.key)
        os.remove(files.cert)
        e = self.assertRaises(tls.TLSConfigError, tls.server_tls, self.cert_dir)
        self.assertIn("cert.pem", str(e))
        self.assertEqual(read_file(files.key), key)
        self.assertFalse(os.path.exists(files.cert))


class BareSSLTests(unittest.SynchronousTestCase):
    """Which ssl: descriptions are bare, and the tcp: description under them."""

    def test_ssl_naming_no_tls_settings_is_bare(self):
        """An ssl: with a port and only TCP settings is bare."""
        for description in (
            "ssl:8443",
            "ssl:0",
            "ssl:8443:interface=127.0.0.1",
            "ssl:port=8443:backlog=5",
            r"ssl:8443:interface=\:\:1",
        ):
            self.assertTrue(tls.is_bare_ssl(description), description)

    def test_ssl_naming_any_tls_setting_is_not_bare(self):
        """An ssl: naming any of Twisted's TLS settings is left to Twisted."""
        for description in (
            "ssl:0:privateKey=/srv/tls/key.pem:certKey=/srv/tls/cert.pem",
            "ssl:0:certKey=/srv/tls/server.pem",
            "ssl:0:privateKey=/srv/tls/server.pem",
            "ssl:0:interface=127.0.0.1:extraCertChain=/srv/tls/chain.pem",
            "ssl:0:sslmethod=TLSv1_2_METHOD",
            "ssl:0:dhParameters=/srv/tls/dh.pem",
        ):
            self.assertFalse(tls.is_bare_ssl(description), description)
            self.assertTrue(tls.names_tls_files(description), description)

    def test_other_endpoint_types_are_not_bare_ssl(self):
        """tcp:, unix: and systemd: descriptions are not bare ssl: ones."""
        for description in (
            "tcp:8443",
            "tcp:8080:interface=127.0.0.1",
            "unix:/run/signalling.sock",
            "systemd:domain=INET6:index=0",
            "tcp:8443:interface=ssl",
            "",
        ):
            self.assertFalse(tls.is_bare_ssl(description), description)

    def test_tcp_description_keeps_every_argument(self):
        """The tcp: description has the ssl: one's port and arguments as given."""
        self.assertEqual(tls.tcp_description("ssl:8443"), "tcp:8443")
        self.assertEqual(
            tls.tcp_description(r"ssl:8443:interface=\:\:1:backlog=7"),
            r"tcp:8443:interface=\:\:1:backlog=7",
        )

    def test_tcp_description_listens_where_the_ssl_one_says(self):
        """
        Twisted parses the tcp: description into the port, interface and
        backlog the ssl: one named.
        """
        reactor = MemoryReactor()
        description = tls.tcp_description(r"ssl:8443:interface=\:\:1:backlog=7")
        serverFromString(reactor, description).listen(Factory())
        [(port, _, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (8443, 7, "::1"))


class TurnWritesTests(unittest.SynchronousTestCase):
    """
    The TLS layer of a bare ``ssl:`` port sends what one turn of the
    reactor wrote to a connection together, as one write to TLS (one
    record), when the turn ends.
    """

    def setUp(self):
        from twisted.internet.protocol import Protocol
        from twisted.internet.task import Clock
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        self.clock = Clock()
        self.factory = tls.ServerTLSFactory(
            tls.ServerTLS(write_certificate(self.mktemp())),
            Factory.forProtocol(Protocol),
            clock=self.clock,
        )
        self.sent = []
        self.patch(
            TLSMemoryBIOProtocol, "write", lambda protocol, data: self.sent.append((protocol, data))
        )
        self.patch(
            TLSMemoryBIOProtocol,
            "loseConnection",
            lambda protocol: self.sent.append((protocol, "lose")),
        )

    def connection(self):
        return self.factory.buildProtocol(None)

    def test_writes_of_one_turn_go_to_tls_as_one_when_it_ends(self):
        """Three writes in one turn reach TLS as one write, in order, once the turn ends."""
        protocol = self.connection()
        protocol.write(b"one ")
        protocol.writeSequence([b"two ", b"three"])
        protocol.write(b" four")
        self.assertEqual(self.sent, [])
        self.clock.advance(0)
        self.assertEqual(self.sent, [(protocol, b"one two three four")])
        self.clock.advance(0)
        self.assertEqual(len(self.sent), 1)

    def test_connections_written_to_in_one_turn_share_one_timer(self):
        """However many connections a turn writes to, one call sends them all."""
        first, second = self.connection(), self.connection()
        first.write(b"a")
        second.write(b"b")
        first.write(b"c")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual(self.sent, [(first, b"ac"), (second, b"b")])

    def test_a_turn_holds_back_at_most_one_record_of_writes(self):
        """Writes that reach TURN_WRITES in one turn go to TLS at once."""
        protocol = self.connection()
        protocol.write(b"x" * (tls.TURN_WRITES - 1))
        self.assertEqual(self.sent, [])
        protocol.write(b"y")
        self.assertEqual(self.sent, [(protocol, b"x" * (tls.TURN_WRITES - 1) + b"y")])
        self.clock.advance(0)
        self.assertEqual(len(self.sent), 1)

    def test_what_a_closing_connection_holds_goes_before_the_close(self):
        """loseConnection sends the turn's writes first."""
        protocol = self.connection()
        protocol.write(b"last words")
        protocol.loseConnection()
        self.assertEqual(self.sent, [(protocol, b"last words"), (protocol, "lose")])
        self.clock.advance(0)
        self.assertEqual(len(self.sent), 2)

    def test_what_its_own_input_makes_it_write_goes_once_that_is_handled(self):
        """
        Writes a connection's own input causes go when that input is
        handled, with any from earlier in the turn, without a timer.
        """
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        protocol = self.connection()
        other = self.connection()

        def handle(tls_protocol, data):
            tls_protocol.write(b"reply to " + data)
            other.write(b"notice")
            self.assertEqual(self.sent, [])

        self.patch(TLSMemoryBIOProtocol, "dataReceived", handle)
        protocol._first = False
        protocol.dataReceived(b"HELLO")
        self.assertEqual(self.sent, [(protocol, b"reply to HELLO")])
        self.clock.advance(0)
        self.assertEqual(self.sent, [(protocol, b"reply to HELLO"), (other, b"notice")])
