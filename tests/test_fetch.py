"""Remote image fetch (vision/fetch.py): SSRF refusals with a trap server that must see no connection,
the positive path on loopback through injected DNS and routing, redirects, byte cap, deadline."""

from __future__ import annotations

import http.server
import io
import ipaddress
import socket
import threading
import time

import pytest
from PIL import Image

from vision.fetch import (FetchPolicy, RemoteFetcher, RemoteImageFetchFailed, RemoteImageRefused, forbidden_reason,
                          parse_allowed_hosts, system_connect)
from vision.intake import ImageTooLarge, IntakeLimits, UnsupportedImageFormat, load_image, source_bytes

PUBLIC_IP = "93.184.216.34"  # a public address; tests route it to a local server, nothing leaves the host
LIMITS = IntakeLimits()


def png(size: tuple[int, int] = (20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


class Trap:
    """A TCP listener that records every connection it accepts (and answers with an image, so that a
    fetch that wrongly got through would succeed and fail the test twice over)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        body = png()
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.connections.append(peer)
            with conn:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Server:
    """A local HTTP server; `behaviour(handler)` answers each GET. Records (path, Host header)."""

    def __init__(self, behaviour) -> None:
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                requests.append((self.path, self.headers.get("Host")))
                try:
                    behaviour(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_image(handler, body: bytes | None = None) -> None:
    body = png() if body is None else body
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def redirect_to(location: str):
    def behaviour(handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return behaviour


@pytest.fixture
def trap():
    t = Trap()
    yield t
    t.close()


@pytest.fixture
def serve():
    servers = []

    def start(behaviour) -> Server:
        servers.append(Server(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


class FakeNetwork:
    """DNS names -> addresses, and addresses -> local ports; records every lookup and connection."""

    def __init__(self, dns: dict[str, list[str]], routes: dict[str, int]) -> None:
        self.dns, self.routes = dns, routes
        self.lookups: list[str] = []
        self.connects: list[str] = []

    def resolve(self, host: str, port: int, timeout_s: float) -> list[str]:
        self.lookups.append(host)
        if host not in self.dns:
            raise socket.gaierror(f"unknown host {host}")
        return self.dns[host]

    def connect(self, address: str, port: int, timeout_s: float) -> socket.socket:
        self.connects.append(address)
        return system_connect("127.0.0.1", self.routes[address], timeout_s)

    def fetcher(self, *hosts: str, **policy) -> RemoteFetcher:
        return RemoteFetcher(FetchPolicy(allowed_hosts=hosts, **policy), resolve=self.resolve, connect=self.connect)


# --- the address policy -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "non-public"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
])
def test_non_public_addresses_are_forbidden_with_their_reason(address, reason):
    assert forbidden_reason(ipaddress.ip_address(address)).startswith(reason)


@pytest.mark.parametrize("address", [PUBLIC_IP, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_policy_parses_and_matches_hosts():
    policy = FetchPolicy(allowed_hosts=parse_allowed_hosts(" Images.Example.com., *.cdn.test ,,"))
    assert policy.allowed_hosts == ("images.example.com", "*.cdn.test") and policy.enabled
    assert policy.host_allowed("images.example.com") and policy.host_allowed("a.b.cdn.test")
    assert not policy.host_allowed("cdn.test") and not policy.host_allowed("evilcdn.test")
    assert not policy.host_allowed("example.com") and not FetchPolicy().enabled
    for bad in ("http://example.com", "example.com/x", "example.com:80", "exa mple.com", "*"):
        with pytest.raises(ValueError):
            FetchPolicy(allowed_hosts=(bad,))
    with pytest.raises(ValueError, match="disabled"):
        RemoteFetcher(FetchPolicy())


# --- refusals: the trap must see nothing ---------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/a.png", "http://localhost:{port}/a.png",
                                 "http://[::ffff:127.0.0.1]:{port}/a.png", "http://127.1:{port}/a.png"])
def test_loopback_urls_are_refused_with_the_real_resolver(trap, url):
    fetcher = RemoteFetcher(FetchPolicy(allowed_hosts=("127.0.0.1", "localhost", "::ffff:127.0.0.1", "127.1")))
    with pytest.raises(RemoteImageRefused, match="loopback"):
        fetcher.fetch(url.format(port=trap.port))
    assert trap.connections == []


@pytest.mark.parametrize("addresses, reason", [(["169.254.169.254"], "link-local"),
                                               (["::ffff:169.254.169.254"], "link-local"),
                                               ([PUBLIC_IP, "10.0.0.7"], "private"), (["127.0.0.1"], "loopback")])
def test_a_name_resolving_to_a_forbidden_address_is_refused_before_connecting(trap, addresses, reason):
    # Every address routes to the trap: had the fetcher connected anywhere, the trap would have seen it.
    net = FakeNetwork({"metadata.test": addresses}, dict.fromkeys(addresses, trap.port))
    with pytest.raises(RemoteImageRefused, match=reason) as e:
        net.fetcher("metadata.test").fetch("http://metadata.test/latest/meta-data/")
    assert "metadata.test" in str(e.value)
    assert net.lookups == ["metadata.test"] and net.connects == [] and trap.connections == []


@pytest.mark.parametrize("url, match", [("file:///etc/passwd", "only http and https"),
                                        ("ftp://images.test/a.png", "only http and https"),
                                        ("http://user:pw@images.test/a.png", "user name or password"),
                                        ("http://other.test/a.png", "allow-list"),
                                        ("http://bücher.images.test/a.png", "punycode")])
def test_other_schemes_credentials_and_unlisted_hosts_are_refused_unresolved(trap, url, match):
    net = FakeNetwork({"images.test": [PUBLIC_IP], "other.test": [PUBLIC_IP]}, {PUBLIC_IP: trap.port})
    fetcher = net.fetcher("images.test", "*.images.test")
    with pytest.raises(RemoteImageRefused, match=match):
        load_image(url, LIMITS, fetch=fetcher)
    assert net.lookups == [] and trap.connections == []


def test_without_a_fetcher_urls_keep_the_disabled_message():
    for url in ("http://images.test/a.png", "https://images.test/a.png", "file:///etc/passwd"):
        with pytest.raises(UnsupportedImageFormat, match="remote image URLs are disabled"):
            source_bytes(url, LIMITS)


# --- the positive path ---------------------------------------------------------------------------------------------

def test_an_allowed_public_host_is_fetched_from_its_vetted_address(serve):
    server = serve(send_image)
    net = FakeNetwork({"images.test": [PUBLIC_IP]}, {PUBLIC_IP: server.port})
    image = load_image("http://images.test/cat.png?size=small", LIMITS, fetch=net.fetcher("images.test"))
    assert image.size == (20, 10) and image.getpixel((3, 3)) == (10, 200, 30)
    assert server.requests == [("/cat.png?size=small", "images.test")]
    assert net.connects == [PUBLIC_IP]


def test_loopback_server_with_a_test_only_address_policy_and_the_real_network(serve):
    server = serve(send_image)
    fetcher = RemoteFetcher(FetchPolicy(allowed_hosts=("127.0.0.1",)),
                            address_policy=lambda ip: None if ip.is_loopback else forbidden_reason(ip))
    assert fetcher.fetch(f"http://127.0.0.1:{server.port}/x.png") == png()


def test_the_next_vetted_address_is_tried_when_one_refuses_connections(serve):
    server = serve(send_image)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead_port = closed.getsockname()[1]  # nothing listens there once closed
    net = FakeNetwork({"images.test": [PUBLIC_IP, "8.8.8.8"]}, {PUBLIC_IP: dead_port, "8.8.8.8": server.port})
    assert net.fetcher("images.test").fetch("http://images.test/a.png") == png()
    assert net.connects == [PUBLIC_IP, "8.8.8.8"]


def test_dns_is_resolved_once_per_hop_so_a_rebinding_answer_is_never_used(serve):
    server = serve(send_image)
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])  # a rebinding DNS server: public first, then loopback
    net = FakeNetwork({}, {PUBLIC_IP: server.port, "127.0.0.1": server.port})
    net.resolve = lambda host, port, timeout_s: (net.lookups.append(host), next(answers))[1]
    assert net.fetcher("rebind.test").fetch("http://rebind.test/a.png") == png()
    assert net.lookups == ["rebind.test"] and net.connects == [PUBLIC_IP]


# --- redirects ----------------------------------------------------------------------------------------------------

def test_redirect_to_loopback_is_refused_and_the_trap_sees_nothing(trap, serve):
    cdn = serve(redirect_to(f"http://127.0.0.1:{trap.port}/secret"))
    net = FakeNetwork({"cdn.test": [PUBLIC_IP], "127.0.0.1": ["127.0.0.1"]}, {PUBLIC_IP: cdn.port})
    # 127.0.0.1 is even on the allow-list: the address check alone must stop the hop
    with pytest.raises(RemoteImageRefused, match="loopback"):
        net.fetcher("cdn.test", "127.0.0.1").fetch("http://cdn.test/a.png")
    assert len(cdn.requests) == 1 and trap.connections == [] and net.connects == [PUBLIC_IP]


@pytest.mark.parametrize("location, match", [("http://elsewhere.test/a.png", "allow-list"),
                                             ("file:///etc/passwd", "only http and https"),
                                             ("http://meta.test/latest", "link-local")])
def test_every_redirect_hop_is_checked_again(trap, serve, location, match):
    cdn = serve(redirect_to(location))
    net = FakeNetwork({"cdn.test": [PUBLIC_IP], "meta.test": ["169.254.169.254"], "elsewhere.test": [PUBLIC_IP]},
                      {PUBLIC_IP: cdn.port, "169.254.169.254": trap.port})
    with pytest.raises(RemoteImageRefused, match=match):
        net.fetcher("cdn.test", "meta.test").fetch("http://cdn.test/a.png")
    assert trap.connections == []


def test_relative_redirects_are_followed_up_to_the_limit(serve):
    def behaviour(handler) -> None:
        hop = int(handler.path.strip("/") or 0)
        if hop < 2:
            redirect_to(f"/{hop + 1}")(handler)
        else:
            send_image(handler)
    server = serve(behaviour)
    net = FakeNetwork({"cdn.test": [PUBLIC_IP]}, {PUBLIC_IP: server.port})
    assert net.fetcher("cdn.test", max_redirects=2).fetch("http://cdn.test/0") == png()
    assert [path for path, _ in server.requests] == ["/0", "/1", "/2"] and net.lookups == ["cdn.test"] * 3
    with pytest.raises(RemoteImageRefused, match="redirected more than 1 times"):
        net.fetcher("cdn.test", max_redirects=1).fetch("http://cdn.test/0")


# --- size, time and status ----------------------------------------------------------------------------------------

def stream_forever(chunked: bool):
    def behaviour(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        chunk = b"\x89PNG" + b"\0" * 8188
        for _ in range(20_000):  # 160 MB at most, should the client not stop
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
    return behaviour


@pytest.mark.parametrize("chunked", [False, True])
def test_the_byte_cap_stops_an_endless_download_mid_stream(serve, chunked):
    server = serve(stream_forever(chunked))
    net = FakeNetwork({"big.test": [PUBLIC_IP]}, {PUBLIC_IP: server.port})
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match="limit is 100000 bytes"):
        net.fetcher("big.test", max_bytes=100_000).fetch("http://big.test/huge.png")
    assert time.monotonic() - start < 3


def test_a_declared_length_over_the_cap_is_refused_before_reading(serve):
    def behaviour(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(10 ** 9))
        handler.end_headers()
        time.sleep(3)  # never sends the body: the client must not wait for it
    server = serve(behaviour)
    net = FakeNetwork({"big.test": [PUBLIC_IP]}, {PUBLIC_IP: server.port})
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match="1000000000 bytes"):
        net.fetcher("big.test", max_bytes=1000).fetch("http://big.test/a.png")
    assert time.monotonic() - start < 1.5


def trickle(handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    for _ in range(60):  # one byte every 0.1 s: each read is quick, the whole would take hours
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.1)


def stall(handler) -> None:
    time.sleep(4)  # accepts, reads the request, never answers


@pytest.mark.parametrize("behaviour", [trickle, stall])
def test_one_deadline_covers_the_whole_fetch(serve, behaviour):
    server = serve(behaviour)
    net = FakeNetwork({"slow.test": [PUBLIC_IP]}, {PUBLIC_IP: server.port})
    start = time.monotonic()
    with pytest.raises(RemoteImageFetchFailed, match="longer than 1 s"):
        net.fetcher("slow.test", timeout_s=1.0).fetch("http://slow.test/a.png")
    assert 0.9 < time.monotonic() - start < 2.0


def test_error_statuses_and_unknown_hosts_are_fetch_failures(serve):
    def not_found(handler) -> None:
        handler.send_error(404, "no such image")
    server = serve(not_found)
    net = FakeNetwork({"cdn.test": [PUBLIC_IP]}, {PUBLIC_IP: server.port})
    with pytest.raises(RemoteImageFetchFailed, match="404"):
        net.fetcher("cdn.test", "gone.test").fetch("http://cdn.test/a.png")
    with pytest.raises(RemoteImageFetchFailed, match="could not resolve"):
        net.fetcher("cdn.test", "gone.test").fetch("http://gone.test/a.png")
