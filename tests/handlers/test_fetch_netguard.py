"""SSRF guard: address rules, URL tricks, DNS pinning, and redirects, on real loopback servers."""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers.config import FetchSettings
from handlers.errors import FetchForbidden, ImageError
from handlers.fetch import Fetcher, HttpSource
from handlers.netguard import check_url, classify_address, domain_allowed
from tests.fakes import FakeResolver, RerouteBackend
from tests.images import encode, pattern
from tests.servers import ImageServer

PNG = encode(pattern(16, 16))
PUBLIC = "93.184.215.14"  # never dialled: RerouteBackend sends it to loopback


def _path() -> str:
    return f"/{uuid.uuid4().hex}.png"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.170.2", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),
        ("192.0.0.192", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("100.64.0.1", "non-public"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 of 169.254.169.254
        ("::7f00:1", "loopback"),  # IPv4-compatible 127.0.0.1
    ],
)
def test_internal_addresses_are_classified(address: str, reason: str) -> None:
    assert classify_address(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700::1111",
                                     "::ffff:8.8.8.8", "1.1.1.1"])
def test_public_addresses_pass(address: str) -> None:
    assert classify_address(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1\\@example.com/",
        "http://user@127.0.0.1/x.png",
        "http://example.com@127.0.0.1/x.png",
        "http://user:pw@example.com/x.png",
        "http://2130706433/x.png",
        "http://0x7f.1/x.png",
        "http://0x7f000001/x.png",
        "http://0177.0.0.1/x.png",
        "http://127.1/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[::1]/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://example.com/a\\b.png",
        "http://exa mple.com/x.png",
        "ftp://example.com/x.png",
    ],
)
def test_url_tricks_are_refused(url: str) -> None:
    with pytest.raises(ImageError) as info:
        check_url(url, FetchSettings())
    assert info.value.status == 400


def test_tricks_are_refused_even_with_private_networks_allowed() -> None:
    # userinfo and odd numeric forms are refused outright, guard on or off
    for url in ("http://user@127.0.0.1/", "http://2130706433/", "http://a\\@b/"):
        with pytest.raises(FetchForbidden):
            check_url(url, FetchSettings(allow_private_networks=True))


def test_domain_allowlist_matches_on_dot_boundaries() -> None:
    allowed = ["example.com", "*.cdn.test", ".img.test"]
    assert domain_allowed("example.com", allowed)
    assert domain_allowed("a.b.example.com", allowed)
    assert domain_allowed("x.cdn.test", allowed)
    assert domain_allowed("img.test", allowed)
    assert not domain_allowed("badexample.com", allowed)
    assert not domain_allowed("example.com.evil.test", allowed)
    assert not domain_allowed("cdn.test.evil", allowed)
    s = FetchSettings(allowed_domains=allowed)
    assert check_url("https://IMG.Example.COM./x.png", s).host == "img.example.com."
    with pytest.raises(FetchForbidden, match="allowed_domains"):
        check_url("https://badexample.com/x.png", s)
    with pytest.raises(FetchForbidden):
        check_url("https://x.png/", FetchSettings(allowed_domains=[]))


async def test_loopback_literal_refused_without_a_request(image_server: ImageServer) -> None:
    path = _path()
    url = image_server.add_bytes(path, PNG)
    async with Fetcher(FetchSettings()) as f:
        with pytest.raises(FetchForbidden) as info:
            await f.fetch(url)
    assert info.value.code == "image_url_forbidden" and info.value.status == 400
    assert image_server.hits[path] == 0


async def test_name_resolving_to_loopback_refused_at_connect(image_server: ImageServer) -> None:
    path = _path()
    image_server.add_bytes(path, PNG)
    resolver = FakeResolver({"images.example.test": ["127.0.0.1"]})
    source = HttpSource(FetchSettings(), resolver)
    async with Fetcher(FetchSettings(), {"http": source}) as f:
        with pytest.raises(FetchForbidden, match="loopback"):
            await f.fetch(f"http://images.example.test:{image_server.port}{path}")
    assert resolver.calls["images.example.test"] == 1
    assert image_server.hits[path] == 0


async def test_any_internal_address_in_the_answer_refuses(image_server: ImageServer) -> None:
    path = _path()
    image_server.add_bytes(path, PNG)
    resolver = FakeResolver({"mixed.example.test": [PUBLIC, "10.0.0.7"]})
    backend = RerouteBackend(image_server.port)
    s = FetchSettings()
    async with Fetcher(s, {"http": HttpSource(s, resolver, network_backend=backend)}) as f:
        with pytest.raises(FetchForbidden, match="private"):
            await f.fetch(f"http://mixed.example.test{path}")
    assert backend.dialled == [] and image_server.hits[path] == 0


async def test_connection_goes_to_the_checked_address(image_server: ImageServer) -> None:
    """Resolve once, check, dial that address; Host stays the name (no DNS rebinding)."""
    path = _path()
    image_server.add_bytes(path, PNG)
    # A rebinding DNS server: public first, loopback on every later lookup.
    resolver = FakeResolver({"rebind.example.test": [[PUBLIC], ["127.0.0.1"]]})
    backend = RerouteBackend(image_server.port)
    s = FetchSettings(cache_max_bytes=0)
    async with Fetcher(s, {"http": HttpSource(s, resolver, network_backend=backend)}) as f:
        got = await f.fetch(f"http://rebind.example.test:8080{path}")
    assert got.data == PNG
    assert backend.dialled == [(PUBLIC, 8080)]
    assert resolver.calls["rebind.example.test"] == 1
    assert image_server.hosts[-1] == "rebind.example.test:8080"


async def test_redirect_to_internal_targets_refused(image_server: ImageServer) -> None:
    target = _path()
    image_server.add_bytes(target, PNG)
    port = image_server.port
    resolver = FakeResolver({"public.example.test": [PUBLIC],
                             "internal.example.test": ["10.0.0.5"]})
    backend = RerouteBackend(port)
    s = FetchSettings()
    hops = {
        "/to-literal": f"http://127.0.0.1:{port}{target}",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-name": f"http://internal.example.test:{port}{target}",
        "/to-mapped": f"http://[::ffff:127.0.0.1]:{port}{target}",
        "/to-userinfo": f"http://public.example.test@127.0.0.1:{port}{target}",
        "/to-file": "file:///etc/passwd",
    }
    async with Fetcher(s, {"http": HttpSource(s, resolver, network_backend=backend)}) as f:
        for name, location in hops.items():
            path = f"/{uuid.uuid4().hex}{name}"
            image_server.add_redirect(path, location)
            with pytest.raises(FetchForbidden):
                await f.fetch(f"http://public.example.test{path}")
            assert image_server.hits[path] == 1, name  # the first hop was fetched
    assert image_server.hits[target] == 0
    assert {ip for ip, _ in backend.dialled} == {PUBLIC}


async def test_allowlist_checked_on_every_hop(image_server: ImageServer) -> None:
    target = _path()
    image_server.add_bytes(target, PNG)
    resolver = FakeResolver({"img.example.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    s = FetchSettings(allow_private_networks=True, allowed_domains=["example.test"])
    first = f"/{uuid.uuid4().hex}"
    image_server.add_redirect(first, f"http://other.test:{image_server.port}{target}")
    async with Fetcher(s, {"http": HttpSource(s, resolver)}) as f:
        with pytest.raises(FetchForbidden, match="allowed_domains"):
            await f.fetch(f"http://img.example.test:{image_server.port}{first}")
        ok = await f.fetch(f"http://img.example.test:{image_server.port}{target}")
    assert ok.data == PNG and image_server.hits[target] == 1


@contextlib.contextmanager
def tls_image_server(
    hostname: str, directory: Path, path: str
) -> Iterator[tuple[ImageServer, ssl.SSLContext, FakeResolver]]:
    """An https image server serving PNG at `path` under a self-signed certificate for
    `hostname` (cert.pem in `directory`), a client context trusting it, and a resolver
    sending `hostname` to it."""
    from tests.servers import self_signed_tls

    server_ctx, client_ctx = self_signed_tls(hostname, directory)
    server = ImageServer(tls=server_ctx)
    try:
        server.add_bytes(path, PNG)
        yield server, client_ctx, FakeResolver({hostname: ["127.0.0.1"]})
    finally:
        server.close()


async def test_https_keeps_sni_and_certificate_hostname(tmp_path) -> None:
    with tls_image_server("images.example.test", tmp_path, "/tls.png") as (
        server, client_ctx, resolver,
    ):
        s = FetchSettings(allow_private_networks=True)
        source = HttpSource(s, resolver, ssl_context=client_ctx)
        async with Fetcher(s, {"http": source}) as f:
            got = await f.fetch(f"https://images.example.test:{server.port}/tls.png")
            assert got.data == PNG
            assert server.sni == ["images.example.test"]
            assert server.hosts == [f"images.example.test:{server.port}"]
            # The certificate names the host, not the address: dialling the IP must fail.
            with pytest.raises(ImageError):
                await f.fetch(f"https://127.0.0.1:{server.port}/tls.png")


async def test_ca_bundle_trusts_an_internal_ca_and_only_then(tmp_path) -> None:
    with tls_image_server("images.internal.test", tmp_path, "/ca.png") as (server, _, resolver):
        url = f"https://images.internal.test:{server.port}/ca.png"
        public = FetchSettings(allow_private_networks=True)
        async with Fetcher(public, {"http": HttpSource(public, resolver)}) as f:
            with pytest.raises(ImageError):  # not signed by a public CA
                await f.fetch(url)
        internal = FetchSettings(allow_private_networks=True, ca_bundle=str(tmp_path / "cert.pem"))
        async with Fetcher(internal, {"http": HttpSource(internal, resolver)}) as f:
            assert (await f.fetch(url)).data == PNG
