"""
How the daemon reaches its upstreams: the roots it trusts (the system's,
and those of C{--ca-file} and C{SSL_CERT_FILE}), and the outbound proxies
of C{HTTPS_PROXY}, C{HTTP_PROXY} and C{NO_PROXY}, read as curl reads them.

Certificate verification is always on. An https upstream behind a proxy is
reached through a C{CONNECT} tunnel (Twisted's C{ProxyAgent} only forwards
plain http): the tunnel is written here, and TLS runs inside it to the
upstream itself, so the proxy sees neither the requests nor credentials.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from attrs import define, field, frozen
from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ProxyAgent
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

#: The roots trusted besides the system's: a certificate authority of
#: one's own (a corporate CA, a test CA).
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
#: Where Linux distributions keep the system's bundle of roots.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)
#: The most a proxy's answer to CONNECT may be before its end.
MAX_CONNECT_RESPONSE = 16 * 1024


class OutboundError(ValueError):
    """
    A setting for reaching upstreams that cannot be used, in one sentence.
    """


def load_roots(paths: Sequence[str]) -> list[crypto.X509]:
    """
    Every certificate in the PEM files C{paths}.
    """
    roots = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise OutboundError(f"Cannot read the CA file {path}: {e.strerror}.") from None
        blocks = _PEM.findall(data)
        if not blocks:
            raise OutboundError(f"{path} holds no PEM certificate.")
        for block in blocks:
            try:
                roots.append(crypto.load_certificate(crypto.FILETYPE_PEM, block))
            except crypto.Error:
                raise OutboundError(f"{path} holds a certificate that cannot be read.") from None
    return roots


try:
    from twisted.internet._sslverify import IOpenSSLTrustRoot
except ImportError:  # pragma: no cover - Twisted has had it since 14.0
    raise


@implementer(IOpenSSLTrustRoot)
@frozen
class SystemAnd:
    """
    The system's roots (OpenSSL's default paths), and C{extra}.
    """

    extra: list[crypto.X509]

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        # With SSL_CERT_FILE set, OpenSSL's defaults are that file alone:
        # the system's bundle is added by name, so that it adds, not replaces.
        for bundle in SYSTEM_BUNDLES:
            if os.path.exists(bundle):
                context.load_verify_locations(bundle)
                break
        store = context.get_cert_store()
        for certificate in self.extra:
            store.add_cert(certificate)


@frozen
class NoProxy:
    """
    C{NO_PROXY}: hosts (and their subdomains), domains with a leading dot,
    IP addresses and networks, a C{:port} to narrow any, or C{*} for all.
    """

    entries: list[tuple[str, int | None]]

    @classmethod
    def parse(cls, value: str) -> NoProxy:
        entries = []
        if value.strip() == "*":
            return cls([("*", None)])
        for item in re.split(r"[,\s]+", value):
            item = item.strip().lower()
            if not item or item == "*":  # a wildcard only when it is the whole value
                continue
            port: int | None = None
            m = re.fullmatch(r"(.+?):(\d+)", item)
            if m and not item.startswith("["):
                item, port = m[1], int(m[2])
            entries.append((item.strip("[]"), port))
        return cls(entries)

    def bypasses(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        for entry, entry_port in self.entries:
            if entry_port is not None and entry_port != port:
                continue
            if entry == "*":
                return True
            entry = entry.lstrip("*")  # "*.example.com", as some write it
            try:
                network = ipaddress.ip_network(entry, strict=False)
                if ipaddress.ip_address(host) in network:
                    return True
                continue
            except ValueError:
                pass
            domain = entry.lstrip(".")
            if host == domain or host.endswith("." + domain):
                return True
        return False


@frozen
class Proxy:
    """
    An outbound proxy: where it is, and the Proxy-Authorization of its URL's
    user and password (if it has them).
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, value: str, variable: str) -> Proxy:
        parts = urlsplit(value if "://" in value else "http://" + value)
        if parts.scheme != "http" or not parts.hostname:
            raise OutboundError(f"{variable} is an http:// proxy address (host and port), not another scheme.")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(parts.hostname, parts.port or 80, authorization)


class _Tunnel(Protocol):
    """
    Asks the proxy for a tunnel; once it answers 200, the connection is the
    tunnel, handed to the protocol it is for.
    """

    def __init__(self, target: bytes, authorization: str | None, factory: IProtocolFactory,
                 ready: defer.Deferred[Any]) -> None:
        self._target = target
        self._authorization = authorization
        self._factory = factory
        self._ready = ready
        self._buffer = b""

    def connectionMade(self) -> None:
        request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (self._target, self._target)
        if self._authorization is not None:
            request += b"Proxy-Authorization: " + self._authorization.encode("latin-1") + b"\r\n"
        transport: Any = self.transport
        transport.write(request + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_CONNECT_RESPONSE:
                self._fail("the proxy's answer to CONNECT is too long")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4:]
        status = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/") or not re.fullmatch(rb"2\d\d", status[1]):
            line = head.split(b"\r\n", 1)[0].decode("latin-1")[:100]
            self._fail(f"the proxy refused the tunnel ({line})")
            return
        # The tunnel is up: from here the connection is the upstream's.
        transport: Any = self.transport
        protocol = self._factory.buildProtocol(transport.getPeer())
        if protocol is None:
            self._fail("no protocol for the tunnel")
            return
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self._ready.callback(protocol)
        if rest:
            protocol.dataReceived(rest)

    def _fail(self, why: str) -> None:
        if not self._ready.called:
            self._ready.errback(Failure(ConnectionError(why)))
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError("closed"))) -> None:
        if not self._ready.called:
            self._ready.errback(reason)


@implementer(IStreamClientEndpoint)
@define
class TunnelEndpoint:
    """
    A connection to C{host:port} through an HTTP proxy's C{CONNECT}.
    """

    proxy: IStreamClientEndpoint
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        connected: list[Any] = []

        def cancel(d: defer.Deferred[Any]) -> None:
            # Given up on (a timeout): the connection to the proxy goes too.
            attempt.cancel()
            for protocol in connected:
                if protocol.transport is not None:
                    protocol.transport.abortConnection()

        ready: defer.Deferred[Any] = defer.Deferred(cancel)
        target = f"{self.host}:{self.port}".encode("idna")
        tunnel = Factory.forProtocol(lambda: _Tunnel(target, self.authorization, protocolFactory, ready))
        attempt = self.proxy.connect(tunnel)
        attempt.addCallback(connected.append)
        attempt.addErrback(lambda f: ready.errback(f) if not ready.called else None)
        return ready


@implementer(IAgentEndpointFactory)
@define
class _TunnellingEndpoints:
    reactor: Any
    proxy: Proxy
    policy: IPolicyForHTTPS
    connect_timeout: float

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        proxy = HostnameEndpoint(self.reactor, self.proxy.host, self.proxy.port, timeout=self.connect_timeout)
        tunnel = TunnelEndpoint(proxy, host, uri.port, self.proxy.authorization)
        return wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), tunnel)


@implementer(IAgent)
@define
class OutboundAgent:
    """
    Each request straight to its upstream, or through the proxy its scheme
    names unless C{NO_PROXY} says otherwise.
    """

    direct: IAgent
    http_proxy: IAgent | None
    https_tunnel: IAgent | None
    no_proxy: NoProxy

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        parts = urlsplit(uri.decode("ascii"))
        port = parts.port or (443 if parts.scheme == "https" else 80)
        agent = self.https_tunnel if parts.scheme == "https" else self.http_proxy
        if agent is None or self.no_proxy.bypasses(parts.hostname or "", port):
            agent = self.direct
        return agent.request(method, uri, headers, bodyProducer)


@frozen
class Outbound:
    """
    The daemon's settings for reaching upstreams.
    """

    extra_roots: list[crypto.X509] = []
    http_proxy: Proxy | None = None
    https_proxy: Proxy | None = None
    no_proxy: NoProxy = NoProxy([])

    @classmethod
    def from_settings(cls, ca_files: Sequence[str], environ: Mapping[str, str] = os.environ) -> Outbound:
        files = list(ca_files)
        if environ.get("SSL_CERT_FILE"):
            files.append(environ["SSL_CERT_FILE"])

        def variable(name: str) -> str:
            # As curl: the lower-case form first; ALL_PROXY for either.
            return environ.get(name.lower()) or environ.get(name) or environ.get("all_proxy") or \
                environ.get("ALL_PROXY") or ""

        https = variable("HTTPS_PROXY")
        # Not upper-case HTTP_PROXY, which a CGI request can set (httpoxy).
        http = environ.get("http_proxy") or environ.get("all_proxy") or environ.get("ALL_PROXY") or ""
        return cls(
            load_roots(files),
            Proxy.parse(http, "HTTP_PROXY") if http else None,
            Proxy.parse(https, "HTTPS_PROXY") if https else None,
            NoProxy.parse(environ.get("no_proxy") or environ.get("NO_PROXY") or ""),
        )

    def policy(self) -> IPolicyForHTTPS:
        return BrowserLikePolicyForHTTPS(trustRoot=SystemAnd(list(self.extra_roots)))

    def agent(self, reactor: Any, connect_timeout: float, pool: HTTPConnectionPool) -> IAgent:
        policy = self.policy()
        direct = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=pool)
        http_proxy = None
        if self.http_proxy is not None:
            # Plain http through the proxy: the request's whole URL to it.
            endpoint = HostnameEndpoint(reactor, self.http_proxy.host, self.http_proxy.port, timeout=connect_timeout)
            http_proxy = _WithProxyAuthorization(ProxyAgent(endpoint, reactor, pool), self.http_proxy.authorization)
        https_tunnel = None
        if self.https_proxy is not None:
            https_tunnel = Agent.usingEndpointFactory(
                reactor, _TunnellingEndpoints(reactor, self.https_proxy, policy, connect_timeout), pool
            )
        return OutboundAgent(direct, http_proxy, https_tunnel, self.no_proxy)


@implementer(IAgent)
@define
class _WithProxyAuthorization:
    agent: IAgent
    authorization: str | None = field(repr=False)

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        if self.authorization is not None:
            from twisted.web.http_headers import Headers

            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(b"proxy-authorization", [self.authorization.encode("latin-1")])
        return self.agent.request(method, uri, headers, bodyProducer)


#: What every upstream made from now on uses (the daemon sets it at start).
current = Outbound()


def configure(ca_files: Sequence[str], environ: Mapping[str, str] = os.environ) -> Outbound:
    """
    Read the settings and make them the daemon's (raises L{OutboundError}
    in one sentence).
    """
    global current
    current = Outbound.from_settings(ca_files, environ)
    return current
