"""
Tests for signalling.server.tap: the options of ``twistd signalling`` and the
service built from them, on a memory reactor (and, for what a bare ``ssl:``
port serves, through real TLS handshakes on loopback ports).
"""

import copy
import io
import json
import os
import socket
import sys

from autobahn.twisted.resource import WebSocketResource
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Application, IService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.error import CannotListenError
from twisted.internet.testing import (
    MemoryReactor,
    MemoryReactorClock,
    RaisingMemoryReactor,
)
from twisted.logger import ILogObserver, Logger, LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.usage import UsageError
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

import signalling
from signalling.server import listening, tap, tls
from signalling.server.factory import TIMER_ROUNDING, SignallingServerFactory
from signalling.server.settings import MIN_KEEPALIVE
from signalling.server.metrics import Stats
from signalling.core.registry import Registry
from signalling.server.service import PortService, SignallingService
from tests.certificates import tls_exchange, write_certificate, write_lets_encrypt_layout
from tests.helpers import hide_service_manager, http_get, parse, unwrap, websocket_factory

MIB = 1024 * 1024


class OptionsTests(unittest.SynchronousTestCase):
    """Parsing, coercing and checking the command line."""

    def test_port_defaults_to_ssl_8443(self):
        """Without --port the server listens on ssl:8443."""
        self.assertEqual(parse()["port"], ["ssl:8443"])

    def test_port_is_repeatable_and_keeps_order(self):
        """Every --port is kept, in order, and the default is not added."""
        config = parse("--port", "tcp:8080:interface=127.0.0.1", "--port", "ssl:8443")
        self.assertEqual(config["port"], ["tcp:8080:interface=127.0.0.1", "ssl:8443"])

    def test_p_is_short_for_port(self):
        """-p is --port."""
        self.assertEqual(parse("-p", "tcp:8080")["port"], ["tcp:8080"])

    def test_port_list_is_not_shared_between_options(self):
        """Each Options has its own port list (no mutable class default)."""
        parse("--port", "tcp:1")
        self.assertEqual(parse()["port"], ["ssl:8443"])

    def test_disable_ssl_turns_the_default_into_tcp_8443(self):
        """--disable-ssl without --port listens on plaintext tcp:8443."""
        self.assertEqual(parse("--disable-ssl")["port"], ["tcp:8443"])

    def test_disable_ssl_keeps_explicit_plaintext_ports(self):
        """--disable-ssl with a tcp: --port listens there only."""
        config = parse("--disable-ssl", "--port", "tcp:9000")
        self.assertEqual(config["port"], ["tcp:9000"])

    def test_disable_ssl_conflicts_with_an_explicit_ssl_port(self):
        """--disable-ssl and an ssl: --port together are a usage error."""
        self.assertRaises(UsageError, parse, "--disable-ssl", "--port", "ssl:8443")
        self.assertRaises(
            UsageError,
            parse,
            "--port",
            "tcp:8080",
            "--port",
            "ssl:9443",
            "--disable-ssl",
        )

    def test_cert_path_defaults_to_certs(self):
        """--cert-path defaults to certs (relative to the working directory)."""
        self.assertEqual(parse()["cert-path"], "certs")

    def test_cert_path_is_kept_as_given(self):
        """--cert-path takes any directory name."""
        self.assertEqual(
            parse("--cert-path", "/etc/letsencrypt/live/x")["cert-path"],
            "/etc/letsencrypt/live/x",
        )

    def test_keepalive_timeout_defaults_to_30_seconds(self):
        """--keepalive-timeout is 30 seconds unless given."""
        self.assertEqual(parse()["keepalive-timeout"], 30)

    def test_keepalive_timeout_is_a_float(self):
        """--keepalive-timeout accepts fractions of a second."""
        self.assertEqual(parse("--keepalive-timeout", "2.5")["keepalive-timeout"], 2.5)

    def test_hello_timeout_defaults_to_30_seconds(self):
        """--hello-timeout is 30 seconds unless given."""
        self.assertEqual(parse()["hello-timeout"], 30)

    def test_hello_timeout_is_a_float(self):
        """--hello-timeout accepts fractions of a second."""
        self.assertEqual(parse("--hello-timeout", "0.5")["hello-timeout"], 0.5)

    def test_max_message_size_defaults_to_one_mebibyte(self):
        """--max-message-size is 1 MiB unless given (PROTOCOL.md, sizes)."""
        self.assertEqual(parse()["max-message-size"], MIB)

    def test_max_message_size_is_an_integer(self):
        """--max-message-size is coerced to an int number of bytes."""
        size = parse("--max-message-size", "65536")["max-message-size"]
        self.assertEqual(size, 65536)
        self.assertIsInstance(size, int)

    def assertRefused(self, option, values):
        """Assert that each of ``values`` for ``option`` is a usage error."""
        for value in values:
            try:
                config = parse(option, value)
            except UsageError:
                continue
            self.fail(f"{option} {value!r} was accepted as {config[option[2:]]!r}")

    def test_numeric_options_refuse_zero_negatives_and_junk(self):
        """0, negative numbers and non-numbers are usage errors."""
        for option in ("--keepalive-timeout", "--hello-timeout", "--max-message-size"):
            self.assertRefused(option, ["0", "-1", "-0.5", "abc", "", "1s"])
        self.assertRefused("--max-message-size", ["1.5", "1e6"])

    def test_keepalive_below_the_timer_rounding_is_refused(self):
        """
        A keepalive under MIN_KEEPALIVE is a usage error: Autobahn's timers
        round to whole seconds, which would make a shorter one meaningless.
        """
        self.assertRefused("--keepalive-timeout", ["0.5", "0.99"])
        self.assertEqual(
            parse("--keepalive-timeout", str(MIN_KEEPALIVE))["keepalive-timeout"],
            MIN_KEEPALIVE,
        )

    def test_time_options_refuse_not_a_number(self):
        """
        nan is not a number of seconds: it passes a ``<= 0`` check, and
        would fail every timer later (Twisted's callLater asserts delay >= 0).
        """
        self.assertRefused("--keepalive-timeout", ["nan", "NaN", "-nan"])
        self.assertRefused("--hello-timeout", ["nan", "NaN", "-nan"])

    def test_numeric_options_refuse_infinity(self):
        """
        Infinity (spelt out, or a float too large to represent) is not a
        number of seconds or bytes: it passes every comparison with a
        minimum and would make a timer or a limit that never applies.
        """
        for option in ("--keepalive-timeout", "--hello-timeout", "--max-message-size"):
            self.assertRefused(option, ["inf", "Infinity", "+inf", "1e309", "-inf"])

    def test_time_options_accept_large_finite_values(self):
        """A large but finite number of seconds is still accepted."""
        self.assertEqual(parse("--hello-timeout", "1e6")["hello-timeout"], 1e6)
        self.assertEqual(
            parse("--keepalive-timeout", "86400")["keepalive-timeout"], 86400
        )

    def test_health_defaults_to_slash_health(self):
        """The health check is at /health unless given."""
        self.assertEqual(parse()["health"], "/health")

    def test_health_takes_another_path(self):
        """--health names another absolute path."""
        self.assertEqual(parse("--health", "/ready")["health"], "/ready")
        self.assertEqual(parse("--health", "/srv/health")["health"], "/srv/health")

    def test_health_must_be_a_path_other_than_the_root(self):
        """A relative path, the root, a query or a URL is a usage error."""
        for value in ("health", "", "/", "/health?x=1", "http://localhost/health"):
            self.assertRaises(UsageError, parse, "--health", value)

    def test_unknown_option_is_a_usage_error(self):
        """An option the server does not have is a usage error."""
        self.assertRaises(UsageError, parse, "--no-such-option")

    def test_help_describes_every_option(self):
        """The usage text names every option, with the endpoint examples."""
        text = str(tap.Options())
        for option in (
            "--port",
            "--disable-ssl",
            "--cert-path",
            "--keepalive-timeout",
            "--hello-timeout",
            "--max-message-size",
            "--health",
            "--shutdown-timeout",
            "--metrics-port",
            "--log-format",
            "--log-payloads",
            "--trust-proxy",
        ):
            self.assertIn(option, text)
        self.assertIn("ssl:8443", text)
        self.assertIn("tls:systemd:domain=INET6:index=0", text)

    def test_shutdown_timeout_defaults_to_5_seconds(self):
        """--shutdown-timeout is 5 seconds unless given (issue 4: a bounded wait)."""
        self.assertEqual(parse()["shutdown-timeout"], 5.0)

    def test_shutdown_timeout_is_a_float(self):
        """--shutdown-timeout accepts fractions and large finite numbers of seconds."""
        self.assertEqual(parse("--shutdown-timeout", "0.25")["shutdown-timeout"], 0.25)
        self.assertEqual(parse("--shutdown-timeout", "120")["shutdown-timeout"], 120)

    def test_shutdown_timeout_refuses_zero_negatives_junk_and_non_finite(self):
        """
        0, negative numbers, junk, nan and infinity are usage errors: the
        wait must be bounded and positive.
        """
        self.assertRefused(
            "--shutdown-timeout",
            ["0", "-1", "-0.5", "abc", "", "5s", "nan", "NaN", "inf", "1e309"],
        )

    def test_metrics_port_defaults_to_none(self):
        """Without --metrics-port no metrics endpoint is configured."""
        self.assertIsNone(parse()["metrics-port"])

    def test_metrics_port_is_kept_as_given(self):
        """--metrics-port takes an endpoint description as it is."""
        config = parse("--metrics-port", "tcp:9100:interface=127.0.0.1")
        self.assertEqual(config["metrics-port"], "tcp:9100:interface=127.0.0.1")
        self.assertEqual(config["port"], ["ssl:8443"])

    def test_log_format_defaults_to_text(self):
        """The log stays twistd's readable text unless --log-format says otherwise."""
        self.assertEqual(parse()["log-format"], "text")

    def test_log_format_takes_text_or_json(self):
        """--log-format takes text and json."""
        self.assertEqual(parse("--log-format", "json")["log-format"], "json")
        self.assertEqual(parse("--log-format", "text")["log-format"], "text")

    def test_log_format_refuses_anything_else(self):
        """xml, an upper-case JSON and an empty value are usage errors."""
        self.assertRefused("--log-format", ["xml", "JSON", "", "json "])
        e = self.assertRaises(UsageError, parse, "--log-format", "xml")
        self.assertIn("xml", str(e))

    def test_log_payloads_is_off_unless_given(self):
        """Payloads are not logged by default; --log-payloads turns it on."""
        self.assertFalse(parse()["log-payloads"])
        self.assertTrue(parse("--log-payloads")["log-payloads"])

    def test_trust_proxy_defaults_to_no_hops(self):
        """X-Forwarded-For is not trusted unless --trust-proxy is given."""
        self.assertEqual(parse()["trust-proxy"], 0)

    def test_trust_proxy_takes_a_number_of_hops(self):
        """--trust-proxy takes a whole number of hops, 0 included."""
        hops = parse("--trust-proxy", "2")["trust-proxy"]
        self.assertEqual(hops, 2)
        self.assertIsInstance(hops, int)
        self.assertEqual(parse("--trust-proxy", "0")["trust-proxy"], 0)

    def test_trust_proxy_refuses_negatives_fractions_and_junk(self):
        """-1, 1.5, junk and an empty value are usage errors."""
        self.assertRefused("--trust-proxy", ["-1", "1.5", "abc", "", "nan"])


class ServiceTests(unittest.TestCase):
    """What makeService builds, seen through a memory reactor."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        # A cert dir that does not exist: tests that must not create
        # certificates check that it still does not.
        self.cert_dir = os.path.abspath(self.mktemp())
        hide_service_manager(self)

    def start(self, *argv):
        """:returns: the started service for ``argv`` (stopped on cleanup)."""
        service = tap.makeService(
            parse("--cert-path", self.cert_dir, "--create-cert-path", *argv),
            reactor=self.reactor,
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def listening(self):
        """
        :returns: the factory of every port listening on the memory reactor:
            TCP ports (bare ``ssl:`` and ``tls:`` ones among them), then
            Twisted's ``ssl:`` ports, then ``unix:`` ones.
        """
        return [
            entry[1]
            for entry in self.reactor.tcpServers
            + self.reactor.sslServers
            + self.reactor.unixServers
        ]

    def sites(self):
        """
        :returns: the WebSocket factory of every listening port (under its
            TLS layer, if any), in order, asserting that each port has its
            own, with a Site of its own for its pages, and that all of them
            share one registry and one Stats.
        """
        sites = [unwrap(factory) for factory in self.listening()]
        self.assertEqual(len({id(site.web) for site in sites}), len(sites), sites)
        factories = [websocket_factory(site) for site in sites]
        self.assertEqual(len({id(f) for f in factories}), len(factories), factories)
        for factory in factories:
            self.assertIsInstance(factory, SignallingServerFactory)
            self.assertIsInstance(factory.registry, Registry)
            self.assertIs(factory.registry, factories[0].registry)
            self.assertIsInstance(factory.stats, Stats)
            self.assertIs(factory.stats, factories[0].stats)
        return sites

    def the_site(self):
        """:returns: the Site of the one port listening."""
        [site] = self.sites()
        return site

    def tls_ports(self):
        """
        :returns: the ``(port, factory, backlog, interface)`` of every TCP
            port with our TLS on top (the bare ``ssl:`` and ``tls:`` ports),
            asserting that each wraps a Site of its own in a
            :class:`signalling.server.tls.ServerTLSFactory`.
        """
        ports = [
            entry
            for entry in self.reactor.tcpServers
            if isinstance(entry[1], TLSMemoryBIOFactory)
        ]
        sites = self.sites()
        for port in ports:
            self.assertIsInstance(port[1], tls.ServerTLSFactory)
            self.assertIn(port[1].wrappedFactory, sites)
        return ports

    def test_nothing_listens_before_start_service(self):
        """
        makeService returns a SignallingService (the root of the service
        tree, which listens on every port itself, all of them or none: its
        ports are PortService children, not endpoint services that would
        each listen on their own) and binds no port; startService does.
        """
        service = tap.makeService(
            parse(
                "--port", "tcp:8080", "--port", "ssl:8443", "--cert-path", self.cert_dir,
                "--create-cert-path",
            ),
            reactor=self.reactor,
        )
        self.assertIsInstance(service, SignallingService)
        self.assertEqual(len([c for c in service if isinstance(c, PortService)]), 2)
        self.assertFalse(
            [child for child in service if isinstance(child, StreamServerEndpointService)]
        )
        self.assertTrue(IService.providedBy(service))
        self.assertEqual((self.reactor.tcpServers, self.reactor.sslServers), ([], []))
        service.startService()
        self.addCleanup(service.stopService)
        # The bare ssl: port is a TCP port with TLS on top.
        self.assertEqual(len(self.reactor.tcpServers), 2)
        self.assertEqual(len(self.tls_ports()), 1)
        self.assertEqual(self.reactor.sslServers, [])
        self.assertEqual(len(service.listening_ports), 2)

    def test_tcp_port_listens_in_plaintext_on_its_interface(self):
        """tcp:PORT:interface=ADDR listens there, without TLS."""
        self.start("--port", "tcp:8080:interface=127.0.0.1")
        [(port, site, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8080, "127.0.0.1"))
        self.assertIsInstance(site, SignallingServerFactory)
        self.assertIsInstance(site.web, Site)
        self.assertEqual(self.reactor.sslServers, [])
        self.assertFalse(os.path.exists(self.cert_dir))

    def test_disable_ssl_listens_on_tcp_8443_on_all_interfaces(self):
        """--disable-ssl alone listens on plaintext port 8443, every interface."""
        self.start("--disable-ssl")
        [(port, site, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8443, ""))
        self.assertEqual(self.reactor.sslServers, [])

    def test_ssl_port_with_its_own_key_files_serves_them(self):
        """
        An ssl: port naming privateKey= and certKey= is Twisted's ssl:
        endpoint serving that pair; --cert-path is not touched.
        """
        files = write_certificate(self.mktemp())
        self.start(
            "--port",
            "ssl:9443:interface=127.0.0.1:privateKey={}:certKey={}".format(
                quoteStringArgument(files.key), quoteStringArgument(files.cert)
            ),
        )
        [(port, site, context_factory, backlog, interface)] = self.reactor.sslServers
        self.assertEqual((port, interface), (9443, "127.0.0.1"))
        self.assertIs(site, self.the_site())
        self.assertEqual(
            context_factory.certificate.to_cryptography(),
            x509.load_pem_x509_certificate(files.pem),
        )
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertFalse(os.path.exists(self.cert_dir))

    @inlineCallbacks
    def test_bare_ssl_port_serves_the_pair_in_cert_path(self):
        """
        A bare ssl: port is a TCP port on the same port and interface with
        our TLS layer over the Site, serving cert.pem/key.pem from
        --cert-path, which are left unchanged.
        """
        files = write_certificate(self.cert_dir)
        with open(files.key, "rb") as f:
            key_before = f.read()
        self.start("--port", "ssl:9443:interface=127.0.0.1:backlog=7")
        [(port, factory, backlog, interface)] = self.tls_ports()
        self.assertEqual((port, backlog, interface), (9443, 7, "127.0.0.1"))
        self.assertEqual(self.reactor.sslServers, [])
        client = yield tls_exchange(factory, files.pem)
        self.assertEqual(client.chain, [x509.load_pem_x509_certificate(files.pem)])
        with open(files.cert, "rb") as f:
            self.assertEqual(f.read(), files.pem)
        with open(files.key, "rb") as f:
            self.assertEqual(f.read(), key_before)
        self.assertEqual(sorted(os.listdir(self.cert_dir)), ["cert.pem", "key.pem"])

    @inlineCallbacks
    def test_bare_ssl_port_serves_the_site_over_tls(self):
        """
        Over the TLS layer of a bare ssl: port, a real client on a real
        loopback port gets the health check answered by the Site.
        """
        files = write_certificate(self.cert_dir)
        self.start("--port", "ssl:9443")
        [(_, factory, _, _)] = self.tls_ports()
        client = yield tls_exchange(
            factory,
            files.pem,
            b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received)
        self.assertTrue(client.received.endswith(b"\r\n\r\nOK\n"), client.received)

    @inlineCallbacks
    def test_bare_ssl_port_agrees_on_http_1_1_with_alpn_clients(self):
        """
        A client that offers ALPN (browsers and curl offer h2 first) agrees
        on http/1.1 and is served, pages and WebSocket upgrades alike.
        """
        files = write_certificate(self.cert_dir)
        self.start("--port", "ssl:9443")
        [(_, factory, _, _)] = self.tls_ports()
        client = yield tls_exchange(
            factory,
            files.pem,
            b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            alpn=[b"h2", b"http/1.1"],
        )
        self.assertEqual(client.protocol, b"http/1.1")
        self.assertTrue(client.received.endswith(b"\r\n\r\nOK\n"), client.received)
        client = yield tls_exchange(
            factory,
            files.pem,
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            # and a masked close frame, 1000 (mask "abcd").
            b"Sec-WebSocket-Version: 13\r\n\r\n\x88\x82abcd\x62\x8a",
            alpn=[b"h2", b"http/1.1"],
        )
        self.assertTrue(client.received.startswith(b"HTTP/1.1 101 "), client.received)
        # The 101, the ping an auto port sends with it, and the close.
        self.assertTrue(
            client.received.endswith(b"\r\n\r\n\x89\x08dialect?\x88\x02\x03\xe8"), client.received
        )

    @inlineCallbacks
    def test_bare_ssl_port_serves_the_lets_encrypt_chain_once(self):
        """
        With privkey.pem and fullchain.pem only in --cert-path, a bare ssl:
        port serves the leaf once, followed by the rest of fullchain.pem.
        """
        leaf, intermediate = write_lets_encrypt_layout(
            self.cert_dir, with_cert=False, with_chain=False
        )
        self.start("--port", "ssl:9443")
        [(_, factory, _, _)] = self.tls_ports()
        client = yield tls_exchange(
            factory, intermediate.public_bytes(serialization.Encoding.PEM)
        )
        self.assertEqual(client.chain, [leaf, intermediate])

    @inlineCallbacks
    def test_default_port_creates_a_certificate_in_an_empty_cert_path(self):
        """With no --port and no certificate, ssl:8443 serves a new self-signed pair."""
        self.start()
        [(port, factory, backlog, interface)] = self.tls_ports()
        self.assertEqual((port, interface), (8443, ""))
        with open(os.path.join(self.cert_dir, "cert.pem"), "rb") as f:
            pem = f.read()
        client = yield tls_exchange(factory, pem)
        self.assertEqual(client.chain, [x509.load_pem_x509_certificate(pem)])

    @inlineCallbacks
    def test_bare_ssl_ports_share_one_certificate(self):
        """
        Several bare ssl: ports in an empty --cert-path create one pair
        (logged once) and serve it, each port through a TLS layer over its
        own Site.
        """
        made = []

        def server_tls(cert_dir, **kwargs):
            made.append(real_server_tls(cert_dir, **kwargs))
            return made[-1]

        real_server_tls = tls.server_tls
        self.patch(tls, "server_tls", server_tls)
        with capturedLogs() as events:
            self.start("--port", "ssl:8443", "--port", "ssl:9443:interface=127.0.0.1")
        ports = self.tls_ports()
        self.assertEqual(
            [(port[0], port[3]) for port in ports], [(8443, ""), (9443, "127.0.0.1")]
        )
        self.assertEqual(len(made), 1)
        created = [
            e
            for e in events
            if e.get("log_namespace") == "signalling.server.tls"
            and e["log_level"] == LogLevel.warn
        ]
        self.assertEqual(len(created), 1, created)
        self.assertEqual(sorted(os.listdir(self.cert_dir)), ["cert.pem", "key.pem"])
        with open(os.path.join(self.cert_dir, "cert.pem"), "rb") as f:
            pem = f.read()
        for _, factory, _, _ in ports:
            client = yield tls_exchange(factory, pem)
            self.assertEqual(client.chain, [x509.load_pem_x509_certificate(pem)])

    def test_plaintext_and_unix_ports_make_no_certificate(self):
        """tcp: and unix: ports listen without TLS and never create --cert-path."""
        socket_path = os.path.abspath(self.mktemp())
        self.start("--port", "tcp:8080", "--port", "unix:" + socket_path)
        [(port, site, backlog, interface)] = self.reactor.tcpServers
        [unix] = self.reactor.unixServers
        self.assertEqual(unix[0], socket_path)
        self.assertEqual(self.sites(), [site, unix[1]])
        self.assertEqual(self.reactor.sslServers, [])
        self.assertFalse(os.path.exists(self.cert_dir))

    def test_ssl_port_naming_its_key_positionally_is_left_to_twisted(self):
        """
        In Twisted's ssl: syntax the argument after the port is the private
        key (ssl:PORT:KEYFILE, the certificate in the same file). Such a port
        serves that file through Twisted's ssl: endpoint; it is not taken for
        a bare ssl: port whose tcp: form would read KEYFILE as an interface,
        and --cert-path is not touched.
        """
        files = write_certificate(self.mktemp())
        combined = os.path.abspath(self.mktemp())
        with open(files.key, "rb") as f:
            key_pem = f.read()
        with open(combined, "wb") as f:
            f.write(key_pem + files.pem)
        self.start("--port", "ssl:9443:" + quoteStringArgument(combined))
        self.assertEqual(self.reactor.tcpServers, [])
        [(port, site, context_factory, backlog, interface)] = self.reactor.sslServers
        self.assertEqual((port, interface), (9443, ""))
        self.assertEqual(
            context_factory.certificate.to_cryptography(),
            x509.load_pem_x509_certificate(files.pem),
        )
        self.assertFalse(os.path.exists(self.cert_dir))

    def test_several_ports_have_their_own_sites_sharing_one_registry(self):
        """
        Every --port listens, each with its own settings, its own Site and
        its own WebSocket factory (so connections are counted per port),
        all sharing one registry and one Stats: a peer on one port can call
        a peer on another.
        """
        write_certificate(self.cert_dir)
        self.start(
            "--port",
            "tcp:8080:interface=127.0.0.1",
            "--port",
            "ssl:8443",
            "--port",
            r"tcp:8081:interface=\:\:1",
        )
        self.assertEqual(
            [(port, interface) for port, _, _, interface in self.reactor.tcpServers],
            [(8080, "127.0.0.1"), (8443, ""), (8081, "::1")],
        )
        self.assertEqual(
            [(port, interface) for port, _, _, interface in self.tls_ports()],
            [(8443, "")],
        )
        self.assertEqual(self.reactor.sslServers, [])
        self.assertEqual(len(self.sites()), 3)

    def test_websocket_factory_follows_the_options(self):
        """
        Keepalive sets Autobahn's autoPingInterval and (plus the timer
        rounding) autoPingTimeout, the
        message limit maxMessagePayloadSize, and the hello timeout the
        factory's; the factory's clock is the reactor given.
        """
        self.start(
            "--port",
            "tcp:8080",
            "--keepalive-timeout",
            "7.5",
            "--max-message-size",
            "1000",
            "--hello-timeout",
            "3",
        )
        factory = websocket_factory(self.the_site())
        self.assertIsInstance(factory, SignallingServerFactory)
        self.assertEqual(factory.autoPingInterval, 7.5)
        # Autobahn's batched timer may fire up to TIMER_ROUNDING early, so
        # the pong deadline has that added to keep the full keepalive time.
        self.assertEqual(factory.autoPingTimeout, 7.5 + TIMER_ROUNDING)
        self.assertEqual(factory.maxMessagePayloadSize, 1000)
        self.assertEqual(factory.settings.hello_timeout, 3)
        self.assertIs(factory.clock, self.reactor)

    def test_websocket_factory_is_set_deliberately_by_default(self):
        """
        By default: 30 s keepalive, a 1 MiB message limit, close frames
        rather than dropped TCP on protocol errors, and no Autobahn status
        page on plain GETs.
        """
        self.start("--port", "tcp:8080")
        factory = websocket_factory(self.the_site())
        self.assertEqual(factory.autoPingInterval, 30)
        self.assertEqual(factory.autoPingTimeout, 30 + TIMER_ROUNDING)
        self.assertEqual(factory.maxMessagePayloadSize, MIB)
        self.assertFalse(factory.failByDrop)
        self.assertFalse(factory.webStatus)

    def test_each_service_has_its_own_registry(self):
        """Two services share no registry and no Stats (there is no global one)."""
        self.start("--port", "tcp:8080")
        first = websocket_factory(self.the_site())
        other_reactor = MemoryReactorClock()
        service = tap.makeService(parse("--port", "tcp:8080"), reactor=other_reactor)
        service.startService()
        self.addCleanup(service.stopService)
        second = websocket_factory(other_reactor.tcpServers[0][1])
        self.assertIsNot(first, second)
        self.assertIsNot(first.registry, second.registry)
        self.assertIsNot(first.stats, second.stats)

    def test_health_option_moves_the_health_check(self):
        """--health /ready answers OK there, and /health is then a 404."""
        self.start("--port", "tcp:8080", "--health", "/ready")
        site = self.the_site()
        ready = http_get(site, b"/ready")
        self.assertTrue(ready.startswith(b"HTTP/1.1 200 "), ready)
        self.assertTrue(ready.endswith(b"\r\n\r\nOK\n"), ready)
        self.assertTrue(http_get(site, b"/health").startswith(b"HTTP/1.1 404 "))


    @inlineCallbacks
    def test_tls_prefix_wraps_any_endpoint_with_our_tls(self):
        """
        tls:ENDPOINT listens on ENDPOINT (a tcp: port, a unix: socket) with
        our TLS layer (a ServerTLSFactory over the port's Site), serving the
        pair in --cert-path through a real handshake.
        """
        files = write_certificate(self.cert_dir)
        socket_path = os.path.abspath(self.mktemp())
        self.start(
            "--port",
            "tls:tcp:0:interface=127.0.0.1",
            "--port",
            "tls:unix:" + socket_path,
        )
        [(port, factory, backlog, interface)] = self.tls_ports()
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        [unix] = self.reactor.unixServers
        self.assertEqual(unix[0], socket_path)
        self.assertIsInstance(unix[1], tls.ServerTLSFactory)
        self.assertEqual(len(self.sites()), 2)
        self.assertEqual(self.reactor.sslServers, [])
        for server_factory in (factory, unix[1]):
            client = yield tls_exchange(server_factory, files.pem)
            self.assertEqual(client.chain, [x509.load_pem_x509_certificate(files.pem)])

    def test_tls_prefix_and_bare_ssl_share_one_certificate(self):
        """A tls: port and a bare ssl: port load --cert-path once, into one TLS layer."""
        write_certificate(self.cert_dir)
        made = []
        real_server_tls = tls.server_tls
        self.patch(
            tls, "server_tls", lambda cert_dir, **kwargs: made.append(real_server_tls(cert_dir, **kwargs)) or made[-1]
        )
        self.start("--port", "tls:tcp:8444", "--port", "ssl:8443")
        self.assertEqual(len(self.tls_ports()), 2)
        self.assertEqual(len(made), 1)

    def test_metrics_port_listens_with_a_metrics_site(self):
        """
        --metrics-port listens there with a Site of its own, whose resource
        tree hands no request to a WebSocket factory; the public port
        answers /metrics with a 404. (What /metrics answers is checked over
        real HTTP in tests.test_metrics: it renders in a thread.)
        """
        self.start(
            "--port", "tcp:8080", "--metrics-port", "tcp:9100:interface=127.0.0.1"
        )
        (public, _, _, _), (metrics_port, metrics_site, _, interface) = (
            self.reactor.tcpServers
        )
        self.assertEqual((public, metrics_port, interface), (8080, 9100, "127.0.0.1"))
        self.assertIsInstance(metrics_site, Site)
        site = unwrap(self.reactor.tcpServers[0][1])
        self.assertIsNot(metrics_site, site)
        for path in (b"", b"metrics", b"ws"):
            request = DummyRequest([path])
            request.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
            request.requestHeaders.setRawHeaders(b"connection", [b"Upgrade"])
            self.assertNotIsInstance(
                metrics_site.getResourceFor(request), WebSocketResource
            )
        public_response = http_get(site, b"/metrics")
        self.assertTrue(public_response.startswith(b"HTTP/1.1 404 "), public_response)
        self.assertNotIn(b"signalling_peers", public_response)

    def test_a_worker_serves_metrics_on_its_port_and_leaves_the_options_alone(self):
        """
        A worker (--worker-index 2) serves --metrics-port's number plus its
        index; makeService changes nothing in the options it was given.
        """
        config = parse(
            "--cert-path", self.cert_dir, "--port", "tcp:8080",
            "--metrics-port", "tcp:9100:interface=127.0.0.1", "--worker-index", "2",
        )
        before = copy.deepcopy(dict(config))
        service = tap.makeService(config, reactor=self.reactor)
        self.assertEqual(dict(config), before)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([port for port, *_ in self.reactor.tcpServers], [8080, 9102])

    def test_no_metrics_port_by_default(self):
        """Without --metrics-port only the public ports listen."""
        service = self.start("--port", "tcp:8080")
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(len(service.listening_ports), 1)

    def test_trust_proxy_reaches_autobahns_trust_x_forwarded_for(self):
        """
        --trust-proxy N sets Autobahn's trustXForwardedFor to N on every
        port's WebSocket factory; by default it is 0 (the header is ignored).
        """
        write_certificate(self.cert_dir)
        self.start("--port", "tcp:8080", "--port", "ssl:8443", "--trust-proxy", "2")
        for site in self.sites():
            self.assertEqual(websocket_factory(site).trustXForwardedFor, 2)
        other = MemoryReactorClock()
        service = tap.makeService(parse("--port", "tcp:8080"), reactor=other)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(websocket_factory(other.tcpServers[0][1]).trustXForwardedFor, 0)

    def test_log_format_json_sets_the_applications_log_observer(self):
        """
        With --log-format json, attaching the service to a twistd
        Application sets the application's ILogObserver component (which
        twistd logs to instead of its text log) to an observer writing one
        JSON object per line to standard output.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        service = tap.makeService(
            parse("--port", "tcp:8080", "--log-format", "json"), reactor=self.reactor
        )
        application = Application("signalling")
        service.setServiceParent(application)
        self.assertIn(service, list(IService(application)))
        observer = application.getComponent(ILogObserver, None)
        self.assertIsNotNone(observer)
        self.assertTrue(ILogObserver.providedBy(observer))
        Logger(namespace="test", observer=observer).info(
            "peer {uid} registered", uid="alice"
        )
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["message"], "peer alice registered")
        self.assertEqual(record["uid"], "alice")
        self.assertEqual(record["level"], "info")

    def test_log_format_text_leaves_twistds_log_alone(self):
        """With the default --log-format text the application gets no ILogObserver."""
        service = tap.makeService(parse("--port", "tcp:8080"), reactor=self.reactor)
        application = Application("signalling")
        service.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))

    def test_log_payloads_warns_at_start(self):
        """
        --log-payloads logs one warning naming the option before anything
        listens, and every port's WebSocket factory logs payloads; without
        it nothing is said and nothing is logged.
        """
        with capturedLogs() as events:
            self.start("--port", "tcp:8080", "--port", "tcp:8081", "--log-payloads")
        warnings = [
            e
            for e in events
            if e["log_level"] == LogLevel.warn and e["log_namespace"] == "signalling.server.tap"
        ]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("--log-payloads", warnings[0]["log_format"])
        for site in self.sites():
            self.assertTrue(websocket_factory(site).settings.log_payloads)

        self.reactor = MemoryReactorClock()
        with capturedLogs() as events:
            self.start("--port", "tcp:8080")
        self.assertEqual(
            [e for e in events if e["log_level"] >= LogLevel.warn], []
        )
        self.assertFalse(websocket_factory(self.the_site()).settings.log_payloads)


class VersionTests(unittest.SynchronousTestCase):
    """The project's version, on request and in the start-up log."""

    def test_version_option_prints_the_version_and_exits_0(self):
        """``twistd signalling --version`` prints ``signalling VERSION`` and exits 0."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, parse, "--version")
        self.assertEqual(e.code, 0)
        self.assertEqual(out.getvalue(), f"signalling {signalling.__version__}\n")

    def test_the_start_is_logged_with_the_version(self):
        """makeService logs the version once, at info."""
        hide_service_manager(self)
        with capturedLogs() as events:
            tap.makeService(parse("--port", "tcp:0"), reactor=MemoryReactor())
        [event] = [e for e in events if e.get("version") == signalling.__version__]
        self.assertEqual(event["log_level"], LogLevel.info)


class StartupErrorTests(unittest.SynchronousTestCase):
    """
    What the operator must fix is one line starting with ``signalling: ``
    (a ``SystemExit``), and nothing listens.
    """

    def setUp(self):
        self.reactor = MemoryReactor()
        self.cert_dir = os.path.abspath(self.mktemp())
        hide_service_manager(self)

    def assertStartupError(self, *argv):
        """
        Assert that makeService for ``argv`` raises a one-line SystemExit.

        :returns: its message.
        """
        config = parse("--cert-path", self.cert_dir, *argv)
        e = self.assertRaises(SystemExit, tap.makeService, config, reactor=self.reactor)
        message = e.code
        self.assertIsInstance(message, str)
        self.assertTrue(message.startswith("signalling: "), message)
        self.assertNotIn("\n", message)
        self.assertEqual((self.reactor.tcpServers, self.reactor.sslServers), ([], []))
        return message

    def test_missing_certificate_next_to_its_key(self):
        """
        key.pem without cert.pem in --cert-path is an error naming cert.pem;
        the key is not overwritten by a new self-signed pair.
        """
        files = write_certificate(self.cert_dir)
        os.remove(files.cert)
        with open(files.key, "rb") as f:
            key = f.read()
        message = self.assertStartupError("--port", "ssl:8443")
        self.assertIn("cert.pem", message)
        with open(files.key, "rb") as f:
            self.assertEqual(f.read(), key)

    def test_missing_explicit_certificate_file(self):
        """An ssl: port naming a certKey= that does not exist names that file."""
        files = write_certificate(self.mktemp())
        missing = os.path.abspath(self.mktemp())
        message = self.assertStartupError(
            "--port",
            "ssl:8443:privateKey={}:certKey={}".format(
                quoteStringArgument(files.key), quoteStringArgument(missing)
            ),
        )
        self.assertIn(missing, message)

    def test_unreadable_certificate_file(self):
        """
        A cert.pem that cannot be read (a directory: that binds root too) is
        an error naming it.
        """
        files = write_certificate(self.cert_dir)
        os.remove(files.cert)
        os.mkdir(files.cert)
        message = self.assertStartupError("--port", "ssl:8443")
        self.assertIn(files.cert, message)

    def test_key_that_does_not_match_its_certificate(self):
        """A key.pem from another pair is an error naming both files."""
        files = write_certificate(self.cert_dir)
        other = write_certificate(self.mktemp())
        os.replace(other.key, files.key)
        message = self.assertStartupError("--port", "ssl:8443")
        self.assertIn("does not match", message)
        self.assertIn(files.key, message)

    def test_explicit_key_that_does_not_match_its_certificate(self):
        """An ssl: port naming a mismatched pair is refused at startup too."""
        files = write_certificate(self.mktemp())
        other = write_certificate(self.mktemp())
        self.assertStartupError(
            "--port",
            "ssl:8443:privateKey={}:certKey={}".format(
                quoteStringArgument(other.key), quoteStringArgument(files.cert)
            ),
        )

    def test_certificate_that_is_not_pem(self):
        """A cert.pem that holds no PEM certificate is an error naming it."""
        files = write_certificate(self.cert_dir)
        with open(files.cert, "wb") as f:
            f.write(b"\x30\x82 DER or junk, not PEM")
        message = self.assertStartupError("--port", "ssl:8443")
        self.assertIn(files.cert, message)

    def test_key_that_is_not_pem(self):
        """A key.pem that holds no PEM key is an error naming it."""
        files = write_certificate(self.cert_dir)
        with open(files.key, "wb") as f:
            f.write(b"not a key\n")
        message = self.assertStartupError("--port", "ssl:8443")
        self.assertIn(files.key, message)

    def test_unwritable_cert_dir_when_a_certificate_must_be_created(self):
        """
        A --cert-path that cannot be created (under a regular file: that
        binds root too) is an error naming it.
        """
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "wb") as f:
            f.write(b"a file, not a directory")
        self.cert_dir = os.path.join(blocker, "certs")
        message = self.assertStartupError("--port", "ssl:8443")
        self.assertIn(self.cert_dir, message)

    def test_malformed_bare_ssl_descriptions_create_no_certificate(self):
        """
        A malformed bare ssl: description is one line naming the description
        as given (not its tcp: form), and is refused before a certificate is
        created in --cert-path.
        """
        for description in (
            "ssl:",
            "ssl:notaport",
            "ssl:8443:bogus=1",
            "ssl:80\n80",
            "ssl:port=",
        ):
            message = self.assertStartupError("--port", description)
            self.assertTrue(
                message.startswith(f"signalling: cannot use --port {description!r}: "),
                message,
            )
            self.assertFalse(os.path.exists(self.cert_dir), description)

    def test_malformed_port_after_a_bare_ssl_port_creates_no_certificate(self):
        """
        A malformed --port anywhere on the command line is refused before any
        certificate is created: otherwise the failed start leaves a new
        self-signed pair behind, the warning with its fingerprint is lost
        with it (twistd has not started logging), and the next start serves
        the pair with only an info line.
        """
        for bad in ("ssl:notaport", "frob:8443"):
            message = self.assertStartupError(
                "--port", "ssl:8443", "--port", bad
            )
            self.assertIn(repr(bad), message)
            self.assertFalse(os.path.exists(self.cert_dir), bad)

    def test_malformed_endpoint_descriptions(self):
        """
        An unknown endpoint type, a bad port number, an unknown argument or
        a line break in the description is one line naming the description.
        """
        for description in (
            "frob:8443",
            "tcp:notaport",
            "tcp:8080:bogus=1",
            "",
            "tcp:80\n80",
        ):
            message = self.assertStartupError("--port", description)
            self.assertIn(repr(description), message)

    def test_port_that_cannot_be_bound(self):
        """
        A port that cannot be bound when twistd starts the service (in use,
        or privileged) is one line naming the address, not a traceback.
        """
        self.reactor = RaisingMemoryReactor(
            listenException=CannotListenError("127.0.0.1", 8443, OSError(98, "in use"))
        )
        service = tap.makeService(
            parse("--port", "tcp:8443:interface=127.0.0.1"), reactor=self.reactor
        )
        e = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertIsInstance(e.code, str)
        self.assertTrue(e.code.startswith("signalling: "), e.code)
        self.assertIn("127.0.0.1:8443", e.code)
        self.assertNotIn("\n", e.code)

    def test_malformed_tls_prefixed_endpoint(self):
        """
        A tls: port whose endpoint is malformed is one line naming the
        description as given, and no certificate is created.
        """
        for description in ("tls:frob:8443", "tls:tcp:notaport", "tls:tcp:8443:bogus=1"):
            message = self.assertStartupError("--port", description)
            self.assertTrue(
                message.startswith(f"signalling: cannot use --port {description!r}: "),
                message,
            )
            self.assertFalse(os.path.exists(self.cert_dir), description)

    def test_tls_prefix_without_an_endpoint(self):
        """
        ``--port tls:`` (no endpoint after the prefix) is one line naming
        it. It must not fall through to Twisted's own ``tls:PEM_DIRECTORY``
        server endpoint, which would read the empty path as the working
        directory, walk all of it for .pem files (in a large tree that
        hangs the start) and listen on port 443 of every interface.
        """
        empty = os.path.abspath(self.mktemp())
        os.mkdir(empty)
        self.addCleanup(os.chdir, os.getcwd())
        # In an empty directory the walk is instant; see the docstring.
        os.chdir(empty)
        message = self.assertStartupError("--port", "tls:")
        self.assertIn("'tls:'", message)

    def test_malformed_metrics_port(self):
        """
        A malformed --metrics-port is one line naming that option and the
        description (not --port, which is fine), and is refused before a
        certificate is created for a bare ssl: port.
        """
        for description in ("frob:9100", "tcp:notaport", "tcp:9100:bogus=1"):
            message = self.assertStartupError(
                "--port", "ssl:8443", "--metrics-port", description
            )
            self.assertIn(repr(description), message)
            self.assertIn("--metrics-port", message)
            self.assertNotIn("--port '", message)
            self.assertFalse(os.path.exists(self.cert_dir), description)

    def test_bare_port_number_suggests_an_ssl_or_tcp_endpoint(self):
        """
        ``--port 8444`` (a number, not an endpoint) is one line suggesting
        ``ssl:8444`` and ``tcp:8444``, not Twisted's "Unknown endpoint type".
        """
        message = self.assertStartupError("--port", "8444")
        self.assertIn("ssl:8444", message)
        self.assertIn("tcp:8444", message)
        self.assertNotIn("Unknown endpoint type", message)
        self.assertFalse(os.path.exists(self.cert_dir))

    def test_cert_path_that_does_not_exist_is_not_created(self):
        """
        A --cert-path other than the default that does not exist (a typo)
        is one line saying so and naming --create-cert-path; no directory
        and no certificate is created.
        """
        message = self.assertStartupError("--port", "ssl:8443")
        self.assertIn(f"--cert-path {self.cert_dir} does not exist", message)
        self.assertIn("--create-cert-path", message)
        self.assertFalse(os.path.exists(self.cert_dir))

    def test_create_cert_path_creates_a_missing_one_with_a_certificate(self):
        """With --create-cert-path, a missing --cert-path gets a self-signed pair."""
        config = parse("--cert-path", self.cert_dir, "--create-cert-path")
        tap.makeService(config, reactor=self.reactor)
        self.assertEqual(sorted(os.listdir(self.cert_dir)), ["cert.pem", "key.pem"])

    def test_an_existing_empty_cert_path_gets_a_certificate(self):
        """A --cert-path that exists but is empty is filled, as before."""
        os.makedirs(self.cert_dir)
        tap.makeService(parse("--cert-path", self.cert_dir), reactor=self.reactor)
        self.assertEqual(sorted(os.listdir(self.cert_dir)), ["cert.pem", "key.pem"])

    def test_the_default_cert_path_is_created_in_the_working_directory(self):
        """Without --cert-path, ./certs is created with a self-signed pair."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(workdir)
        tap.makeService(parse(), reactor=self.reactor)
        self.assertEqual(
            sorted(os.listdir(os.path.join(workdir, "certs"))), ["cert.pem", "key.pem"]
        )


class FakeListeningSocket:
    """What :func:`signalling.server.listening.ipv6_only_socket` returns, for a memory reactor."""

    def __init__(self, interface, port, backlog):
        self.address = (interface, port, backlog)
        self.closed = False

    def fileno(self):
        return 99

    def close(self):
        self.closed = True


class DefaultPortTests(unittest.TestCase):
    """
    The default port listens on IPv4 and IPv6 (as GStreamer's example
    server does); an explicit --port exactly as given.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.cert_dir = os.path.abspath(self.mktemp())
        self.sockets = []
        hide_service_manager(self)

        def ipv6_only_socket(interface, port, backlog):
            self.sockets.append(FakeListeningSocket(interface, port, backlog))
            return self.sockets[-1]

        self.patch(listening, "ipv6_only_socket", ipv6_only_socket)

    start = ServiceTests.start

    def test_default_listens_on_every_ipv4_and_ipv6_address_with_tls(self):
        """
        Without --port: TLS on port 8443 of every IPv4 address, and on an
        IPv6-only socket for every IPv6 address, both through our TLS layer
        with the same certificate.
        """
        service = self.start()
        [(port, v4, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8443, ""))
        [(fileno, family, v6)] = self.reactor.adoptedPorts
        self.assertEqual(family, socket.AF_INET6)
        [sock] = self.sockets
        self.assertEqual(sock.address, ("::", 8443, 4096))
        self.assertTrue(sock.closed, "the reactor keeps its own copy")
        for factory in (v4, v6):
            self.assertIsInstance(factory, tls.ServerTLSFactory)
            websocket_factory(factory.wrappedFactory)
        self.assertEqual(sorted(os.listdir(self.cert_dir)), ["cert.pem", "key.pem"])
        self.assertEqual(len(service.listening_ports), 2)

    def test_disable_ssl_default_listens_on_both_families_in_plaintext(self):
        """--disable-ssl without --port: plaintext 8443 on IPv4 and IPv6."""
        self.start("--disable-ssl")
        [(port, v4, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8443, ""))
        [(_, family, v6)] = self.reactor.adoptedPorts
        self.assertEqual(family, socket.AF_INET6)
        for factory in (v4, v6):
            self.assertIsInstance(factory, SignallingServerFactory)
        self.assertFalse(os.path.exists(self.cert_dir))

    def test_an_explicit_port_is_exactly_as_given(self):
        """--port ssl:8443 listens on IPv4 only, as the description says."""
        self.start("--port", "ssl:8443")
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(self.reactor.adoptedPorts, [])
        self.assertEqual(self.sockets, [])

    def test_without_ipv6_the_default_listens_on_ipv4_with_a_warning(self):
        """
        On a machine without IPv6 the default port still starts, on IPv4,
        with one warning.
        """

        def no_ipv6(interface, port, backlog):
            raise listening.FamilyUnavailable("[Errno 97] Address family not supported")

        self.patch(listening, "ipv6_only_socket", no_ipv6)
        with capturedLogs() as events:
            service = self.start()
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(len(self.successResultOf(service.ready)), 1)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn
                     and e.get("log_namespace", "").startswith("signalling.server.service")]
        self.assertIn("no IPv6", warning["reason"])


class SystemdEndpointTests(unittest.SynchronousTestCase):
    """
    ``--port systemd:...``: sockets handed over by systemd, found by index
    or name, and errors that say what is missing.
    """

    def endpoint(self, description, descriptors=(), names=(), listening_fds=()):
        return listening.systemd_endpoint(
            MemoryReactor(),
            description,
            inherited=(list(descriptors), list(names)),
            is_listening=lambda fd: fd in listening_fds,
        )

    def error(self, *args, **kwargs):
        e = self.assertRaises(ValueError, self.endpoint, *args, **kwargs)
        return str(e)

    def test_named_sockets_are_found_by_index_and_by_name(self):
        """With names (systemd's own way), index= and name= both work."""
        by_index = self.endpoint("systemd:domain=INET6:index=1", [3, 4], ["a", "b"])
        self.assertEqual((by_index.fileno, by_index.addressFamily), (4, socket.AF_INET6))
        by_name = self.endpoint("systemd:domain=INET:name=b", [3, 4], ["a", "b"])
        self.assertEqual((by_name.fileno, by_name.addressFamily), (4, socket.AF_INET))

    def test_sockets_passed_without_names_are_found_by_index(self):
        """
        Without LISTEN_FDNAMES (``systemd-socket-activate`` without
        ``--fdname``), Twisted sees nothing; a listening socket at 3 + index
        is used all the same.
        """
        endpoint = self.endpoint("systemd:domain=INET:index=0", listening_fds={3})
        self.assertEqual(endpoint.fileno, 3)

    def test_no_socket_passed_in_says_so(self):
        """Nothing passed in: the error says so and how to start it instead."""
        message = self.error("systemd:domain=INET:index=0")
        self.assertIn("no socket was passed in", message)
        self.assertIn("LISTEN_FDS", message)
        self.assertIn("ssl:8443", message)
        self.assertIn("no socket was passed in", self.error("systemd:domain=INET:name=x"))

    def test_index_beyond_the_sockets_passed_in_says_how_many_there_are(self):
        """index=2 with two sockets: the error counts them."""
        message = self.error("systemd:domain=INET:index=2", [3, 4], ["a", "b"])
        self.assertIn("systemd passed 2 sockets", message)
        self.assertIn("index=2", message)
        unnamed = self.error("systemd:domain=INET:index=1", listening_fds={3})
        self.assertIn("file descriptor 4", unnamed)

    def test_name_without_names_or_unknown_name_says_what_is_missing(self):
        """name= needs LISTEN_FDNAMES; an unknown name lists the names there are."""
        message = self.error("systemd:domain=INET:name=web", listening_fds={3})
        self.assertIn("LISTEN_FDNAMES is not set", message)
        self.assertIn("--fdname=web", message)
        message = self.error("systemd:domain=INET:name=web", [3], ["signalling.socket"])
        self.assertIn("no socket named 'web'", message)
        self.assertIn("signalling.socket", message)

    def test_malformed_descriptions(self):
        """A missing or unknown domain, or both or neither of index= and name=."""
        self.assertIn("domain=", self.error("systemd:index=0", [3], ["a"]))
        self.assertIn("unknown domain", self.error("systemd:domain=FOO:index=0", [3], ["a"]))
        self.assertIn("exactly one", self.error("systemd:domain=INET", [3], ["a"]))
        self.assertIn(
            "exactly one", self.error("systemd:domain=INET:index=0:name=a", [3], ["a"])
        )

    def test_through_make_service_the_error_is_one_line_naming_the_option(self):
        """Through makeService, a systemd port with nothing passed in is one line."""
        hide_service_manager(self)
        self.patch(listening, "_inherited", lambda: ([], []))
        self.patch(listening, "listening_socket_at", lambda fd: False)
        e = self.assertRaises(
            SystemExit,
            tap.makeService,
            parse("--port", "tls:systemd:domain=INET6:index=0"),
            reactor=MemoryReactor(),
        )
        self.assertTrue(
            e.code.startswith(
                "signalling: cannot use --port 'tls:systemd:domain=INET6:index=0': "
                "no socket was passed in"
            ),
            e.code,
        )


class ListenCheckTests(unittest.TestCase):
    """
    Under twistd, a busy port is found before the process forks into the
    background, with the line the start would give.
    """

    def setUp(self):
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        self.busy = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(self.busy.stopListening)
        self.port = self.busy.getHost().port

    def test_a_busy_port_is_one_line_naming_the_option(self):
        """A port in use: a StartupError (a SystemExit) naming the address and the option."""
        endpoint = f"tcp:{self.port}:interface=127.0.0.1"
        for option in ("--port", "--metrics-port"):
            e = self.assertRaises(
                SystemExit, listening.check_can_listen, endpoint, "tcp:x", option
            )
            self.assertIsInstance(e, Exception)
            self.assertIn(f"127.0.0.1:{self.port}", e.code)
            self.assertIn(f"choose another port with {option}", e.code)

    def test_a_free_port_passes_and_stays_free(self):
        """A free port passes the check, and is free again afterwards."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        listening.check_can_listen(f"tcp:{port}:interface=127.0.0.1", "tcp:x")
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

    def test_endpoints_without_a_port_of_their_own_are_not_checked(self):
        """unix: and port 0 need no check."""
        listening.check_can_listen("tcp:0", "tcp:0")
        path = os.path.abspath(self.mktemp())
        listening.check_can_listen(f"unix:{path}", "unix:")
        self.assertFalse(os.path.exists(path))

    def test_listen_addresses_are_read_from_descriptions(self):
        """tcp:, tcp6: and ssl: descriptions give their family, interface, port and backlog."""
        cases = {
            "tcp:8443": (socket.AF_INET, "", 8443, 50),
            "tcp:8080:interface=127.0.0.1:backlog=9": (socket.AF_INET, "127.0.0.1", 8080, 9),
            "tcp:port=7:interface=\\:\\:1": (socket.AF_INET6, "::1", 7, 50),
            "tcp6:9000": (socket.AF_INET6, "::", 9000, 50),
            "ssl:443:key.pem:interface=10.0.0.1": (socket.AF_INET, "10.0.0.1", 443, 50),
        }
        for description, expected in cases.items():
            address = listening.listen_address(description)
            self.assertEqual(
                (address.family, address.interface, address.port, address.backlog),
                expected,
                description,
            )
        for other in ("unix:/x", "systemd:domain=INET:index=0", "tcp:notaport"):
            self.assertIsNone(listening.listen_address(other), other)
