"""Remote image URLs: an allow-listed fetcher, off unless the operator names hosts.

A server that fetches URLs for its clients is a proxy into its own network: the named threats are
requests to the cloud metadata service (169.254.169.254), to services on loopback or the private
network, and unbounded downloads (RELIABILITY, "remote images"; vLLM CVE-2026-34753). So:

- Only http and https, only hosts on the allow-list (`*.example.com` matches subdomains only), and
  no user name or password in the URL.
- We resolve the host ourselves and refuse it if ANY of its addresses is loopback, private,
  link-local, multicast, reserved, unspecified or otherwise not publicly routable, including an IPv4
  address carried inside an IPv6 one (IPv4-mapped, 6to4, Teredo, NAT64). Then we connect to the
  vetted address itself, so no second lookup can answer differently (DNS rebinding). TLS still
  verifies the certificate against the host name.
- Redirects are followed by hand, at most `max_redirects`, and every hop is checked again in full
  (scheme, allow-list, addresses); a redirect from https to http is refused.
- One deadline (`timeout_s`, 5 s as in vLLM) covers DNS, connecting, headers and body: a watchdog
  shuts the socket at the deadline, so a server that trickles a byte at a time cannot stretch it.
- The body is read in chunks and the download stops as soon as it passes `max_bytes`; a declared
  Content-Length over the cap is refused before reading anything.

The fetcher returns the raw bytes; decoding (with the pixel cap) is intake's job. The resolver and
the connection opener are injectable so tests can point "public" names at a local server; the
address policy itself is not a setting.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from vision.intake import ImageError, ImageTooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int, float], list[str]]  # (host, port, timeout_s) -> addresses
Connector = Callable[[str, int, float], socket.socket]  # (address, port, timeout_s) -> connected socket

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK_BYTES = 64 * 1024
_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RemoteImageRefused(ImageError):
    """The URL is not one this server will fetch (scheme, host, address, redirects)."""

    code = "remote_image_refused"


class RemoteImageFetchFailed(ImageError):
    """The URL was allowed but the download failed (DNS, connection, status, timeout)."""

    code = "remote_image_fetch_failed"


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """A comma-separated setting -> normalised host patterns (empty: remote fetch disabled)."""
    return tuple(h.strip().lower().rstrip(".") for h in text.split(",") if h.strip())


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    allowed_hosts: tuple[str, ...] = ()  # empty: remote fetch disabled
    timeout_s: float = 5.0  # everything, DNS to last byte
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3

    def __post_init__(self) -> None:
        hosts = tuple(h.lower().rstrip(".") for h in self.allowed_hosts)
        object.__setattr__(self, "allowed_hosts", hosts)
        for host in hosts:
            if not (_is_ip_literal(host) or _HOST_PATTERN.match(host)):
                raise ValueError(f"allowed image host {host!r} is not a host name, '*.domain' or an IP address "
                                 f"(no scheme, port or path)")
        if self.timeout_s <= 0 or self.max_bytes <= 0 or self.max_redirects < 0:
            raise ValueError("remote image fetch: timeout_s and max_bytes must be > 0, max_redirects >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
                   for pattern in self.allowed_hosts)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def forbidden_reason(address: IPAddress) -> str | None:
    """Why we must not connect to `address` ('loopback', 'private', ...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # a connection to it goes to the IPv4 address: judge that
            inner = forbidden_reason(address.ipv4_mapped)
            return None if inner is None else f"{inner} (IPv4 {address.ipv4_mapped} inside IPv6)"
        teredo_client = address.teredo[1] if address.teredo else None
        nat64 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None
        embedded = address.sixtofour or teredo_client or nat64
        if embedded is not None:
            inner = forbidden_reason(embedded)
            if inner is not None:
                return f"{inner} (IPv4 {embedded} inside IPv6)"
    for attribute, reason in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                              ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                              ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(address, attribute):
            return reason
    if not address.is_global:  # e.g. 100.64.0.0/10, carrier-grade NAT
        return "non-public"
    return None


def system_resolve(host: str, port: int, timeout_s: float) -> list[str]:
    """getaddrinfo, bounded by the deadline: it has no timeout of its own, so it runs on a helper
    thread that is abandoned (it ends with the resolver's own timeout) when the deadline passes."""
    result: list = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            result.append(error)

    worker = threading.Thread(target=lookup, name="image-fetch-dns", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        raise TimeoutError(f"DNS lookup of {host!r} took longer than {timeout_s:.1f} s")
    if isinstance(result[0], OSError):
        raise result[0]
    addresses = [info[4][0] for info in result[0]]
    return list(dict.fromkeys(addresses))  # unique, in the resolver's order


def system_connect(address: str, port: int, timeout_s: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout_s)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self._end


class _PinnedConnection(http.client.HTTPConnection):
    """http.client speaking to `host` (Host header, TLS server name) over a socket to one of the vetted
    `addresses`, tried in order. `on_connect` sees the TCP socket before the TLS handshake (the watchdog)."""

    def __init__(self, host: str, port: int, addresses: list[str], deadline: _Deadline, connector: Connector,
                 tls: ssl.SSLContext | None, on_connect: Callable[[socket.socket], None]) -> None:
        super().__init__(host, port, timeout=deadline.remaining())
        self._addresses, self._deadline, self._connector = addresses, deadline, connector
        self._tls, self._on_connect = tls, on_connect

    def connect(self) -> None:
        for i, address in enumerate(self._addresses):
            try:
                sock = self._connector(address, self.port, self._deadline.remaining())
                break
            except OSError:
                if i == len(self._addresses) - 1 or self._deadline.passed:
                    raise
        self._on_connect(sock)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host) if self._tls else sock


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."


class RemoteFetcher:
    """`fetch(url) -> bytes` under a `FetchPolicy`. Thread-safe: it keeps no state between calls."""

    def __init__(self, policy: FetchPolicy, *, resolve: Resolver = system_resolve,
                 connect: Connector = system_connect,
                 address_policy: Callable[[IPAddress], str | None] = forbidden_reason,
                 tls: ssl.SSLContext | None = None) -> None:
        """`address_policy(address)` is None for an address we may connect to, else the reason not to;
        only tests replace it (to reach a server on loopback)."""
        if not policy.enabled:
            raise ValueError("remote image fetch is disabled (no allowed hosts); do not build a fetcher")
        self.policy = policy
        self._resolve, self._connect, self._forbidden = resolve, connect, address_policy
        self._tls = tls or ssl.create_default_context()

    def __call__(self, url: str) -> bytes:
        return self.fetch(url)

    def fetch(self, url: str) -> bytes:
        deadline = _Deadline(self.policy.timeout_s)
        try:
            for _hop in range(self.policy.max_redirects + 1):
                body, location = self._get(url, deadline)
                if location is None:
                    return body
                next_url = urljoin(url, location)
                if url.lower().startswith("https:") and next_url.lower().startswith("http:"):
                    raise RemoteImageRefused(f"{_short(url)} redirects from https to http; refused")
                url = next_url
        except TimeoutError:
            raise RemoteImageFetchFailed(f"fetching {_short(url)} took longer than {self.policy.timeout_s:g} s; "
                                         f"send the image as a data: URL instead") from None
        raise RemoteImageRefused(f"the image URL redirected more than {self.policy.max_redirects} times")

    def _vet(self, url: str, deadline: _Deadline) -> tuple[str, str, int, list[str]]:
        """Check one hop's URL and resolve it: (scheme, host, port, vetted addresses)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise RemoteImageRefused(f"only http and https image URLs are fetched, not {scheme or 'this'}: URLs")
        if parts.username is not None or parts.password is not None:
            raise RemoteImageRefused("image URLs must not carry a user name or password")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise RemoteImageRefused(f"the image URL {_short(url)!r} has no host")
        if not host.isascii():
            raise RemoteImageRefused(f"write the image host {host!r} in its ASCII (punycode) form")
        if not self.policy.host_allowed(host):
            raise RemoteImageRefused(f"the host {host!r} is not on this server's allow-list for image URLs; "
                                     f"send the image as a data: URL")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise RemoteImageRefused(f"the image URL {_short(url)!r} has an invalid port") from None
        try:
            addresses = self._resolve(host, port, deadline.remaining())
        except TimeoutError:
            raise
        except OSError as error:
            raise RemoteImageFetchFailed(f"could not resolve the image host {host!r}: {error}") from None
        if not addresses:
            raise RemoteImageFetchFailed(f"the image host {host!r} has no addresses")
        for text in addresses:
            reason = self._forbidden(ipaddress.ip_address(text.split("%", 1)[0]))
            if reason is not None:
                raise RemoteImageRefused(f"the image host {host!r} resolves to {text}, a {reason} address; "
                                         f"images are fetched from public addresses only")
        return scheme, host, port, addresses

    def _get(self, url: str, deadline: _Deadline) -> tuple[bytes, str | None]:
        """One hop: (body, None), or (b"", Location) for a redirect."""
        scheme, host, port, addresses = self._vet(url, deadline)
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        watchdogs: list[threading.Timer] = []

        def start_watchdog(sock: socket.socket) -> None:
            timer = threading.Timer(deadline.remaining(), _shut, (sock,))
            timer.daemon = True
            timer.start()
            watchdogs.append(timer)

        conn = _PinnedConnection(host, port, addresses, deadline, self._connect,
                                 self._tls if scheme == "https" else None, start_watchdog)
        try:
            conn.connect()
            conn.request("GET", path, headers={"Accept": "image/*", "User-Agent": "mmserve-image-fetch",
                                               "Connection": "close"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise RemoteImageFetchFailed(f"{_short(url)} answered {response.status} without a Location")
                return b"", location
            if response.status != 200:
                raise RemoteImageFetchFailed(f"the image server answered {response.status} {response.reason} "
                                             f"for {_short(url)}")
            return self._read_body(url, response, deadline), None
        except (OSError, http.client.HTTPException) as error:
            if deadline.passed or isinstance(error, TimeoutError):
                raise TimeoutError from None
            raise RemoteImageFetchFailed(f"could not fetch {_short(url)}: {error!r}") from None
        finally:
            for watchdog in watchdogs:
                watchdog.cancel()
            conn.close()

    def _read_body(self, url: str, response: http.client.HTTPResponse, deadline: _Deadline) -> bytes:
        cap = self.policy.max_bytes
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            raise ImageTooLarge(f"the image at {_short(url)} is {int(declared)} bytes; the limit is {cap} bytes")
        chunks, total = [], 0
        while True:
            deadline.remaining()
            chunk = response.read(_CHUNK_BYTES)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > cap:  # stop the download here, whatever the server meant to send
                raise ImageTooLarge(f"the image at {_short(url)} is more than {cap} bytes; the limit is {cap} bytes")
            chunks.append(chunk)


def _shut(sock: socket.socket | None) -> None:
    """The watchdog: wakes any blocked read on the socket, which then fails."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
