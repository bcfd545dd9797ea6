"""Where http(s) image fetches may go: URL rules, address rules, and a guarded connector.

The address check sits in the network backend, at the moment a TCP connection is opened:
the host httpx actually connects to is resolved once, every address is checked, and the
socket goes to one of those checked addresses. TLS still uses the original hostname for
SNI and certificate checks, and the Host header is untouched. Parsing tricks and DNS
rebinding cannot slip past a check that runs on the address being dialled.
URL-level rules (scheme, userinfo, numeric hosts, allowlist) run before any request and
again on every redirect hop; `read_body` maps statuses and caps bytes while streaming.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
import typing
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import httpcore
import httpx

from handlers.capped import CappedBuffer
from handlers.config import FetchSettings
from handlers.errors import (
    FetchForbidden,
    FetchTimeout,
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    ImageUnreachable,
    UpstreamUnavailable,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Cloud instance-metadata and similar endpoints. Most are already non-global, but some
# (Azure's wireserver, Oracle's 192.0.0.192) are not caught by ipaddress's flags.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "169.254.169.253",  # AWS VPC DNS
        "168.63.129.16",  # Azure wireserver (a public address)
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS time sync over IPv6
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def parse_ip(host: str) -> IPAddress | None:
    """The address if `host` is an IP literal (brackets allowed), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # IPv6 forms that carry an IPv4 address which the network may route to.
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def classify_address(ip: IPAddress) -> str | None:
    """Why this address must not be fetched from (e.g. "loopback"), or None if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "link-local"
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on the wire
            return classify_address(ip.ipv4_mapped)
        inner = _embedded_ipv4(ip)
        reason = classify_address(inner) if inner is not None else None
        if reason is not None:
            return reason
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    for reason, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return reason
    # Catches shared address space (100.64/10) and anything else not globally routable.
    return None if ip.is_global else "non-public"


_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")


def domain_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Suffix match on dot boundaries: "example.com" allows a.example.com, not badexample.com."""
    for entry in allowed:
        d = entry.strip().lower().rstrip(".").removeprefix("*.").lstrip(".")
        if d and (host == d or host.endswith("." + d)):
            return True
    return False


def check_url(url: str, settings: FetchSettings) -> httpx.URL:
    """Validate an http(s) URL before any connection; returns it parsed, fragment dropped."""
    # Backslashes, whitespace and control characters are where URL parsers disagree
    # (http://127.0.0.1:1\@example.com/ is example.com to httpx, 127.0.0.1 to others).
    if _CONTROL.search(url):
        raise FetchForbidden("Image URLs must not contain backslashes, spaces or control "
                             "characters; percent-encode them.")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ImageError("The image URL is not a valid URL.") from exc
    if parsed.scheme not in ("http", "https"):
        raise FetchForbidden(f"Image URLs with scheme {parsed.scheme!r} are not allowed here.")
    authority = url.split("//", 1)[1] if "//" in url else ""
    authority = re.split(r"[/?#]", authority, maxsplit=1)[0]
    if parsed.userinfo or "@" in authority:
        raise FetchForbidden("Image URLs must not contain a user name or password (user@host).")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise ImageError("The image URL has no host.")
    ip = parse_ip(host)
    if ip is None and _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
        # 2130706433, 0x7f.1, 0177.0.0.1, 127.1: resolvers read these as IPv4 addresses.
        raise FetchForbidden("Image URL hosts that are IP addresses must be written as "
                             "four decimal numbers (a.b.c.d).")
    if settings.allowed_domains is not None and not domain_allowed(host,
                                                                   settings.allowed_domains):
        raise FetchForbidden(f"The image host {host!r} is not in fetch.allowed_domains.")
    if ip is not None and not settings.allow_private_networks:
        reason = classify_address(ip)
        if reason is not None:
            raise FetchForbidden(f"Image URLs may not point at {reason} addresses.")
    return parsed.copy_with(fragment=None)


class SystemResolver:
    """getaddrinfo in a thread pool of its own (it blocks, and a slow DNS server must not take
    the threads that S3 reads or anything else need); address strings in preference order."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="iris-dns")

    async def __call__(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(socket.getaddrinfo, host, port,
                                          type=socket.SOCK_STREAM))
        return [str(info[4][0]) for info in infos]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves once, checks every address, then connects to a checked address."""

    def __init__(
        self,
        settings: FetchSettings,
        resolver: Resolver | None = None,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._s = settings
        self._resolve = resolver or SystemResolver(settings.dns_threads)
        self._inner = inner or httpcore.AnyIOBackend()

    async def _addresses(self, host: str, port: int, limit_s: float | None) -> list[IPAddress]:
        literal = parse_ip(host)
        if literal is not None:
            return [literal]
        try:
            names = await asyncio.wait_for(self._resolve(host, port), limit_s)
        except TimeoutError as exc:
            raise FetchTimeout("Resolving the image host timed out.") from exc
        except OSError as exc:
            raise ImageUnreachable(f"The image host {host!r} could not be resolved.") from exc
        out: list[IPAddress] = []
        for name in names:
            ip = parse_ip(name)
            if ip is None:  # a resolver must return addresses; anything else is refused
                raise FetchForbidden(f"The image host {host!r} did not resolve to an address.")
            if ip not in out:
                out.append(ip)
        if not out:
            raise ImageUnreachable(f"The image host {host!r} could not be resolved.")
        return out

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._addresses(host, port, timeout)
        if not self._s.allow_private_networks:
            # All or nothing: refusing a name with any internal address leaves no way to
            # steer the connection toward it.
            for ip in addresses:
                reason = classify_address(ip)
                if reason is not None:
                    raise FetchForbidden(
                        f"The image host {host!r} resolves to a {reason} address, "
                        "which is not allowed."
                    )
        error: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise FetchForbidden("Image fetches may not use unix sockets.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(
    settings: FetchSettings,
    resolver: Resolver | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every new connection goes through GuardedBackend."""
    ctx = ssl_context or (ssl.create_default_context(cafile=settings.ca_bundle)
                          if settings.ca_bundle else httpx.create_ssl_context(trust_env=False))
    transport = httpx.AsyncHTTPTransport(verify=ctx, trust_env=False)
    # httpx 0.28 has no public hook for httpcore's network backend; swap in a pool that
    # uses ours (tests prove the guard is on the path by resolving names to loopback).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ctx,
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=GuardedBackend(settings, resolver, network_backend),
    )
    return transport


def next_hop(current: httpx.URL, location: str, settings: FetchSettings) -> httpx.URL:
    """The URL a redirect points at, after the same checks as the first URL."""
    if not location:
        raise ImageError("The image server sent a redirect without a Location.")
    if _CONTROL.search(location):
        raise FetchForbidden("The image URL redirected to a URL with a backslash or space.")
    try:
        joined = current.join(location)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ImageError("The image URL redirected to an invalid URL.") from exc
    return check_url(str(joined), settings)


async def read_body(resp: httpx.Response, cap: int) -> bytes:
    """Map the status to an error, or read the body with `cap` enforced while streaming."""
    status = resp.status_code
    if status in (404, 410):
        raise ImageNotFound(f"The image URL returned HTTP {status}.")
    if status in (401, 403):
        raise FetchForbidden(f"The image URL returned HTTP {status}.")
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"The image server returned HTTP {status}.")
    if status != 200:
        raise ImageError(f"The image URL returned HTTP {status}.")
    body = CappedBuffer(cap, lambda: ImageTooLarge.over_cap(cap))
    body.check_declared(resp.headers.get("content-length"))  # honest servers: refused at once
    async for chunk in resp.aiter_raw():  # the cap, not the header, bounds the read
        body.add(chunk)
    return body.getvalue()
