"""SSRF guard for every outbound request the service makes on a user's behalf.

Used by the gateway to fetch ``https://`` image URLs and by the webhook worker to deliver events.
The rules:

- only ``https`` (``http`` only to loopback, and loopback at all only with the development setting
  ``allow_loopback_http``);
- an IP literal is read in every spelling a resolver accepts (``2852039166``, ``0xa9fea9fe``,
  ``0251.0376.0251.0376``, ``169.254.43518``, ``127.1``) and checked as the address it names, so a
  URL is refused when it is submitted, not only when it is first contacted
  (:func:`check_url_syntax` checks everything that needs no DNS);
- the host is resolved once and every address is checked: loopback, private, link-local,
  carrier-grade NAT, multicast, reserved, unspecified, documentation ranges, cloud metadata
  endpoints, and IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) by that address;
- loopback in development means 127.0.0.0/8 and ::1 only: an IPv6 address that merely embeds a
  loopback IPv4 address (mapped ``::ffff:127.0.0.1``, NAT64 ``64:ff9b::7f00:1``, 6to4
  ``2002:7f00:1::``) is refused even then, since it is routed elsewhere (a NAT64 gateway, a 6to4
  relay) or only by some stacks; IPv4-compatible ``::127.0.0.1`` is refused as deprecated;
- the connection goes to an address that was checked, never to a second DNS answer (no DNS
  rebinding), while the ``Host`` header, TLS SNI and certificate verification still use the
  original hostname (httpx's documented ``sni_hostname`` request extension);
- redirects are never followed, bodies are read up to a limit (and may be streamed to the
  caller's sink a chunk at a time, :func:`fetch_into`, so a large body is never held whole), and
  proxies from the environment are ignored (a proxy would make the checked address meaningless);
- URLs are user data and may carry bearer tokens in their query (presigned image URLs, webhook
  URLs with ``?token=``): httpx's request log lines show them without the query.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import httpx

__all__ = [
    "BadResponse",
    "FetchError",
    "FetchTimeout",
    "HostNotFound",
    "IPAddress",
    "NetGuardError",
    "PostResult",
    "ResponseTooLarge",
    "UnsafeURL",
    "blocked_reason",
    "check_url",
    "check_url_syntax",
    "ip_literal",
    "fetch",
    "fetch_into",
    "normalized_url",
    "post",
    "resolve_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

USER_AGENT = "masactrl-service/0.1"


class NetGuardError(Exception):
    """Base class for everything this module raises."""


class UnsafeURL(NetGuardError, ValueError):
    """The URL is not allowed: wrong scheme, or it resolves to an address we never contact."""


class FetchError(NetGuardError):
    """The request was allowed but did not produce an acceptable response."""

    def __init__(self, message: str, *, duration: float | None = None) -> None:
        super().__init__(message)
        self.duration = duration


class HostNotFound(FetchError):
    """DNS did not resolve the host (often transient)."""


class FetchTimeout(FetchError):
    """Connecting or reading took longer than the timeout."""


class ResponseTooLarge(FetchError):
    """The response body is larger than the caller's limit."""


class BadResponse(FetchError):
    """The server answered with a status the caller does not accept (including redirects)."""

    def __init__(self, message: str, *, status_code: int, duration: float | None = None) -> None:
        super().__init__(message, duration=duration)
        self.status_code = status_code


class PostResult(NamedTuple):
    """A completed POST: the status code (any, including 3xx/4xx/5xx) and seconds it took."""

    status_code: int
    duration: float


class _HideQueries(logging.Filter):
    """Drops the query of every URL in httpx's log records ("HTTP Request: POST <url> ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                a.copy_with(query=b"REDACTED") if isinstance(a, httpx.URL) and a.query else a
                for a in record.args
            )
        return True


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _HideQueries) for f in _httpx_log.filters):
    _httpx_log.addFilter(_HideQueries())

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Checked in order; the first match gives the reason. Metadata endpoints come before the ranges
# that contain them so the message says what was actually being protected.
_BLOCKED_NETWORKS: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, str]] = [
    (_V4("169.254.169.254/32"), "metadata", "a cloud metadata endpoint"),
    (_V4("169.254.170.2/32"), "metadata", "a cloud metadata endpoint (ECS)"),
    (_V4("168.63.129.16/32"), "metadata", "a cloud metadata endpoint (Azure)"),
    (_V4("100.100.100.200/32"), "metadata", "a cloud metadata endpoint (Alibaba)"),
    (_V6("fd00:ec2::254/128"), "metadata", "a cloud metadata endpoint (AWS IPv6)"),
    (_V4("0.0.0.0/8"), "unspecified", "an unspecified ('this network') address"),
    (_V4("127.0.0.0/8"), "loopback", "a loopback address"),
    (_V4("10.0.0.0/8"), "private", "a private address"),
    (_V4("172.16.0.0/12"), "private", "a private address"),
    (_V4("192.168.0.0/16"), "private", "a private address"),
    (_V4("100.64.0.0/10"), "cgnat", "a carrier-grade NAT (shared) address"),
    (_V4("169.254.0.0/16"), "link-local", "a link-local address"),
    (_V4("192.0.0.0/24"), "reserved", "an IETF protocol assignment address"),
    (_V4("192.0.2.0/24"), "reserved", "a documentation address"),
    (_V4("198.51.100.0/24"), "reserved", "a documentation address"),
    (_V4("203.0.113.0/24"), "reserved", "a documentation address"),
    (_V4("198.18.0.0/15"), "reserved", "a benchmarking address"),
    (_V4("192.88.99.0/24"), "reserved", "a 6to4 relay anycast address"),
    (_V4("224.0.0.0/4"), "multicast", "a multicast address"),
    (_V4("255.255.255.255/32"), "reserved", "the broadcast address"),
    (_V4("240.0.0.0/4"), "reserved", "a reserved address"),
    (_V6("::/128"), "unspecified", "the unspecified address"),
    (_V6("::1/128"), "loopback", "a loopback address"),
    (_V6("fc00::/7"), "private", "a unique-local (private) address"),
    (_V6("fe80::/10"), "link-local", "a link-local address"),
    (_V6("fec0::/10"), "private", "a site-local address"),
    (_V6("ff00::/8"), "multicast", "a multicast address"),
    (_V6("100::/64"), "reserved", "a discard-only address"),
    (_V6("2001:db8::/32"), "reserved", "a documentation address"),
    (_V6("3fff::/20"), "reserved", "a documentation address"),
    (_V6("2001::/32"), "reserved", "a Teredo tunnel address"),
    (_V6("2001::/23"), "reserved", "an IETF protocol assignment address"),
    (_V6("::/96"), "reserved", "an IPv4-compatible (deprecated) address"),
    (_V6("::/8"), "reserved", "a reserved address"),
]

_NAT64 = (_V6("64:ff9b::/96"), _V6("64:ff9b:1::/48"))


def _classify(address: IPAddress) -> tuple[str, str] | None:
    """(category, description) of why ``address`` is off limits, or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        # Forms that carry an IPv4 address are judged by that address: ::ffff:127.0.0.1 is
        # loopback, and a NAT64 or 6to4 address reaches the embedded IPv4 host.
        embedded: ipaddress.IPv4Address | None = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            verdict = _classify(embedded)
            if verdict is None:
                return None
            category, description = verdict
            # Never "loopback": the development exemption is for 127.0.0.0/8 and ::1 themselves.
            category = "embedded" if category == "loopback" else category
            return category, f"{description} ({embedded}) embedded in an IPv6 address"
        if address.scope_id:
            return "link-local", "a scoped (link-local) address"
    for network, category, description in _BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return category, description
    # Whatever the table misses but the standard library knows is not globally routable.
    if address.is_loopback:
        return "loopback", "a loopback address"
    if address.is_multicast:
        return "multicast", "a multicast address"
    if address.is_link_local:
        return "link-local", "a link-local address"
    if address.is_private or address.is_reserved or address.is_unspecified:
        return "reserved", "a private or reserved address"
    if not address.is_global:
        return "reserved", "an address that is not publicly routable"
    return None


def blocked_reason(address: str | IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why ``address`` must not be contacted (a phrase such as "a private address"), or None."""
    parsed = ipaddress.ip_address(address) if isinstance(address, str) else address
    verdict = _classify(parsed)
    if verdict is None:
        return None
    category, description = verdict
    if allow_loopback and category == "loopback":
        return None
    return description


def _is_loopback(address: IPAddress) -> bool:
    verdict = _classify(address)
    return verdict is not None and verdict[0] == "loopback"


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in resolver order (tests replace this function)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # ASCII (IDNA) hostname, or the IP literal
    host_is_ip: bool
    addresses: list[IPAddress]


def _describe_url(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."


def _ipv4_number(part: str) -> int | None:
    """One part of a numeric IPv4 host as inet_aton reads it (0x hex, 0 octal), or None."""
    try:
        if part[:2].lower() == "0x":
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part, 10) if part.isdigit() else None
    except ValueError:
        return None


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any form a resolver accepts, or None for a host name.

    Raises :class:`UnsafeURL` for a host that looks numeric but is no address (``1.2.3.4.5``,
    ``example.0x10``, ``256.1.1.1``): resolvers disagree on those, so none is contacted.
    """
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    parts = bare.removesuffix(".").split(".")
    numbers = [_ipv4_number(part) for part in parts]
    if numbers[-1] is None:
        return None  # a name: its last label is not a number
    if len(parts) > 4 or any(n is None for n in numbers):
        raise UnsafeURL(f"{host!r} is not a valid host name or IPv4 address")
    *head, last = [n for n in numbers if n is not None]
    # The last part fills the bytes the others leave: 127.1 is 127.0.0.1.
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise UnsafeURL(f"{host!r} is not a valid IPv4 address (a part is out of range)")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _parse(url: str, allow_loopback_http: bool) -> tuple[httpx.URL, str, IPAddress | None]:
    """Every check that needs no DNS: (URL, host, the address if the host is an IP literal)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UnsafeURL(f"{_describe_url(str(url))!r} is not a valid URL ({exc})") from None
    shown = _describe_url(str(url))
    if parsed.scheme not in ("https", "http"):
        raise UnsafeURL(f"{shown!r} is not allowed: only https URLs are accepted")
    if parsed.userinfo:
        raise UnsafeURL(f"{shown!r} is not allowed: URLs must not contain credentials")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise UnsafeURL(f"{shown!r} is not allowed: it names no host")
    literal = ip_literal(host)
    if literal is not None:
        _refuse_blocked(shown, [literal], allow_loopback_http)
    # For a host name, whether plain http may go to it is known only once it is resolved.
    if (
        parsed.scheme == "http"
        and literal is not None
        and not (allow_loopback_http and _is_loopback(literal))
    ):
        raise UnsafeURL(f"{shown!r} is not allowed: only https URLs are accepted")
    return parsed, host, literal


def _refuse_blocked(shown: str, addresses: list[IPAddress], allow_loopback_http: bool) -> None:
    # Every address is checked: one private answer among public ones is enough to refuse,
    # since the client might otherwise connect to it.
    for address in addresses:
        reason = blocked_reason(address, allow_loopback=allow_loopback_http)
        if reason is not None:
            raise UnsafeURL(
                f"{shown!r} is not allowed: it resolves to {address}, {reason}; only public "
                "addresses may be contacted"
            )


def check_url_syntax(url: str, *, allow_loopback_http: bool = False) -> IPAddress | None:
    """Refuse ``url`` (:class:`UnsafeURL`) for everything decidable without DNS: scheme,
    credentials, and a host that is an IP literal of a blocked address in any spelling.

    Returns the address when the host is an IP literal, None for a host name.
    """
    return _parse(url, allow_loopback_http)[2]


def _check(url: str, allow_loopback_http: bool) -> _Target:
    parsed, host, literal = _parse(url, allow_loopback_http)
    shown = _describe_url(str(url))
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            resolved = resolve_host(host, port)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise HostNotFound(f"the host of {shown!r} does not resolve ({exc})") from None
        addresses = []
        for text in resolved:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                raise UnsafeURL(
                    f"{shown!r} resolves to {text!r}, which is not an IP address"
                ) from None
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise HostNotFound(f"the host of {shown!r} resolves to no address")
    _refuse_blocked(shown, addresses, allow_loopback_http)
    if parsed.scheme == "http" and not (
        allow_loopback_http and all(_is_loopback(address) for address in addresses)
    ):
        raise UnsafeURL(f"{shown!r} is not allowed: only https URLs are accepted")
    return _Target(url=parsed, host=host, host_is_ip=literal is not None, addresses=addresses)


def check_url(url: str, *, allow_loopback_http: bool = False) -> list[IPAddress]:
    """Resolve ``url``'s host and return its addresses if every one may be contacted.

    Raises :class:`UnsafeURL` with a sentence when the URL is refused, :class:`HostNotFound` when
    the host does not resolve.
    """
    return _check(url, allow_loopback_http).addresses


def _pinned_request(
    client: httpx.Client,
    target: _Target,
    address: IPAddress,
    method: str,
    headers: Mapping[str, str],
    content: bytes | None,
) -> httpx.Request:
    # The URL names the checked address, so no second DNS lookup happens; Host and SNI keep the
    # original name so virtual hosting and certificate verification work as for the real URL.
    pinned_url = target.url.copy_with(host=str(address))
    request_headers = {"User-Agent": USER_AGENT}
    request_headers.update((k, v) for k, v in headers.items() if k.lower() != "host")
    request_headers["Host"] = target.url.netloc.decode("ascii")
    extensions = {}
    if target.url.scheme == "https" and not target.host_is_ip:
        extensions["sni_hostname"] = target.host
    return client.build_request(
        method, pinned_url, headers=request_headers, content=content, extensions=extensions
    )


def _open(
    client: httpx.Client,
    target: _Target,
    method: str,
    headers: Mapping[str, str],
    content: bytes | None,
    shown: str,
    started: float,
    timeout: float,
) -> httpx.Response:
    last_error: Exception | None = None
    for address in target.addresses:
        if time.monotonic() - started > timeout:
            break  # each address could take the whole connect timeout; the budget is shared
        request = _pinned_request(client, target, address, method, headers, content)
        try:
            return client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Nothing was sent yet, so trying the next checked address is safe even for POST.
            last_error = exc
        except httpx.TimeoutException as exc:
            raise FetchTimeout(f"{shown!r} timed out", duration=time.monotonic() - started) from exc
        except httpx.HTTPError as exc:
            raise FetchError(
                f"request to {shown!r} failed: {exc}", duration=time.monotonic() - started
            ) from exc
    duration = time.monotonic() - started
    if last_error is None or isinstance(last_error, httpx.ConnectTimeout):
        raise FetchTimeout(f"connecting to {shown!r} timed out", duration=duration) from last_error
    raise FetchError(
        f"cannot connect to {shown!r}: {last_error}", duration=duration
    ) from last_error


def _client(timeout: float, ssl_context: ssl.SSLContext | None) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,  # never route through an environment proxy: it would bypass pinning
        verify=ssl_context if ssl_context is not None else True,
    )


def normalized_url(url: str) -> str:
    """``url`` as the server receives it: scheme and host in lower case, no default port, no
    fragment. Two references that normalize alike name one resource (fetched once per request).
    Unparseable URLs come back as they are (the fetch refuses them)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return url
    return str(parsed.copy_with(fragment=None))


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 10.0,
    allow_loopback_http: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """GET ``url`` through the guard and return the body (at most ``max_bytes``).

    ``timeout`` bounds each network operation and the body download as a whole. Raises
    :class:`UnsafeURL`, :class:`HostNotFound`, :class:`FetchTimeout`, :class:`ResponseTooLarge`,
    :class:`BadResponse` (any non-2xx, redirects included) or :class:`FetchError`.
    """
    body = bytearray()
    fetch_into(
        url,
        body.extend,
        max_bytes=max_bytes,
        timeout=timeout,
        allow_loopback_http=allow_loopback_http,
        ssl_context=ssl_context,
    )
    return bytes(body)


def fetch_into(
    url: str,
    write: Callable[[bytes], object],
    *,
    max_bytes: int,
    timeout: float = 10.0,
    allow_loopback_http: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """GET ``url`` through the guard, handing the body to ``write`` a chunk at a time; return
    its length (at most ``max_bytes``).

    The rules and the errors are :func:`fetch`'s. ``write`` may raise to stop the download (a
    caller's own budget); its exception propagates and the connection is closed.
    """
    shown = _describe_url(url)
    target = _check(url, allow_loopback_http)
    started = time.monotonic()
    deadline = started + timeout
    # Ask for the bytes as stored: a compressed response could inflate far past max_bytes
    # inside a single decoded chunk.
    headers = {
        "Accept": "image/png, image/jpeg, image/webp, */*;q=0.1",
        "Accept-Encoding": "identity",
    }
    with _client(timeout, ssl_context) as client:
        response = _open(client, target, "GET", headers, None, shown, started, timeout)
        try:
            status = response.status_code
            if 300 <= status < 400:
                raise BadResponse(
                    f"{shown!r} answered with a redirect ({status}); redirects are not followed",
                    status_code=status,
                    duration=time.monotonic() - started,
                )
            if not 200 <= status < 300:
                raise BadResponse(
                    f"{shown!r} answered {status} {response.reason_phrase}".rstrip(),
                    status_code=status,
                    duration=time.monotonic() - started,
                )
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchError(
                    f"{shown!r} sent a {encoding}-encoded body; only plain is accepted"
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(
                    f"{shown!r} is {int(declared)} bytes; the limit is {max_bytes}",
                    duration=time.monotonic() - started,
                )
            received = 0
            for chunk in response.iter_raw():
                received += len(chunk)
                if received > max_bytes:
                    raise ResponseTooLarge(
                        f"{shown!r} is larger than the limit of {max_bytes} bytes",
                        duration=time.monotonic() - started,
                    )
                if time.monotonic() > deadline:
                    raise FetchTimeout(
                        f"{shown!r} did not finish within {timeout:g} s",
                        duration=time.monotonic() - started,
                    )
                write(chunk)
            return received
        except httpx.TimeoutException as exc:
            raise FetchTimeout(f"{shown!r} timed out", duration=time.monotonic() - started) from exc
        except httpx.HTTPError as exc:
            raise FetchError(
                f"reading {shown!r} failed: {exc}", duration=time.monotonic() - started
            ) from exc
        finally:
            response.close()


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float = 15.0,
    max_response_bytes: int = 4096,
    allow_loopback_http: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> PostResult:
    """POST ``body`` to ``url`` through the guard; return the status code and the duration.

    Any status is returned (a 3xx is never followed); at most ``max_response_bytes`` of the
    response body are read and discarded. Raises :class:`UnsafeURL`, :class:`HostNotFound`,
    :class:`FetchTimeout` or :class:`FetchError` when no response arrived.
    """
    shown = _describe_url(url)
    target = _check(url, allow_loopback_http)
    started = time.monotonic()
    with _client(timeout, ssl_context) as client:
        response = _open(client, target, "POST", headers, body, shown, started, timeout)
        try:
            received = 0
            for chunk in response.iter_raw():
                received += len(chunk)
                # A receiver's reply is not ours to store; read a little, then hang up.
                if received >= max_response_bytes or time.monotonic() - started > timeout:
                    break
        except httpx.HTTPError:
            pass  # the status line arrived, which is all a delivery needs
        finally:
            response.close()
        return PostResult(response.status_code, time.monotonic() - started)
