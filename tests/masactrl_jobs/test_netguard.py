"""The SSRF guard: address classes, scheme rules, pinning and response limits.

Only loopback is ever contacted: other address classes are checked through a replaced resolver or
literal IPs, and refused before any connection is attempted.
"""

from __future__ import annotations

import ipaddress
import time

import pytest

from masactrl_jobs import netguard
from masactrl_jobs.netguard import (
    BadResponse,
    FetchError,
    FetchTimeout,
    HostNotFound,
    ResponseTooLarge,
    UnsafeURL,
    check_url,
    fetch,
    post,
)
from tests.masactrl_jobs.conftest import TLS_HOSTNAME, LoopbackServer, respond, stream_forever

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


class FakeResolver:
    """Stands in for DNS: maps host names to address lists and counts lookups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            import socket

            raise socket.gaierror(-2, "Name or service not known")
        return self.table[host]


@pytest.fixture()
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver({})
    monkeypatch.setattr(netguard, "resolve_host", fake)
    return fake


BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("fd12:3456::1", "unique-local"),
    ("fec0::1", "site-local"),
    ("169.254.10.10", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.251", "multicast"),
    ("239.1.2.3", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("168.63.129.16", "metadata"),
    ("100.100.100.200", "metadata"),
    ("::ffff:127.0.0.1", "loopback address (127.0.0.1) embedded"),
    ("::ffff:10.0.0.1", "private address (10.0.0.1) embedded"),
    ("::ffff:169.254.169.254", "metadata endpoint (169.254.169.254) embedded"),
    ("64:ff9b::a9fe:a9fe", "metadata endpoint (169.254.169.254) embedded"),
    ("2002:7f00:1::", "loopback address (127.0.0.1) embedded"),
    ("2002:c0a8:101::1", "private address (192.168.1.1) embedded"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("::7f00:1", "IPv4-compatible"),
    ("100::1", "discard"),
]


@pytest.mark.parametrize(("address", "phrase"), BLOCKED)
def test_every_blocked_class_is_refused_by_name(
    resolver: FakeResolver, address: str, phrase: str
) -> None:
    resolver.table["victim.example"] = [address]
    with pytest.raises(UnsafeURL) as caught:
        check_url("https://victim.example/image.png")
    message = str(caught.value)
    assert phrase in message
    assert str(ipaddress.ip_address(address)) in message
    assert message.endswith("only public addresses may be contacted")


@pytest.mark.parametrize(("address", "phrase"), BLOCKED)
def test_blocked_literal_addresses_are_refused_without_resolving(
    resolver: FakeResolver, address: str, phrase: str
) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UnsafeURL, match=phrase.split(" (")[0]):
        check_url(f"https://{host}/x.png")
    assert resolver.calls == []


@pytest.mark.parametrize(
    "address",
    [PUBLIC_V4, PUBLIC_V6, "::ffff:93.184.215.14", "2002:5db8:d70e::1", "64:ff9b::808:808"],
)
def test_public_addresses_pass(resolver: FakeResolver, address: str) -> None:
    resolver.table["images.example"] = [address]
    assert check_url("https://images.example/cat.png") == [ipaddress.ip_address(address)]


def test_one_private_answer_among_public_ones_is_enough_to_refuse(resolver: FakeResolver) -> None:
    resolver.table["mixed.example"] = [PUBLIC_V4, PUBLIC_V6, "10.0.0.7"]
    with pytest.raises(UnsafeURL, match="10.0.0.7"):
        check_url("https://mixed.example/")


def test_duplicate_answers_are_collapsed(resolver: FakeResolver) -> None:
    resolver.table["dup.example"] = [PUBLIC_V4, PUBLIC_V4]
    assert check_url("https://dup.example/") == [ipaddress.ip_address(PUBLIC_V4)]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://images.example/x.png",
        "file:///etc/passwd",
        "gopher://images.example/",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
    ],
)
def test_other_schemes_are_refused(resolver: FakeResolver, url: str) -> None:
    resolver.table["images.example"] = [PUBLIC_V4]
    with pytest.raises(UnsafeURL, match="only https URLs are accepted"):
        check_url(url)


def test_plain_http_is_refused_even_to_a_public_address(resolver: FakeResolver) -> None:
    resolver.table["images.example"] = [PUBLIC_V4]
    with pytest.raises(UnsafeURL, match="only https"):
        check_url("http://images.example/x.png")
    with pytest.raises(UnsafeURL, match="only https"):
        check_url("http://images.example/x.png", allow_loopback_http=True)


def test_loopback_needs_the_development_flag(resolver: FakeResolver) -> None:
    resolver.table["localhost"] = ["127.0.0.1", "::1"]
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url("http://localhost:8000/x.png")
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url("https://localhost/x.png")
    assert len(check_url("http://localhost:8000/x.png", allow_loopback_http=True)) == 2


def test_the_development_flag_opens_loopback_only(resolver: FakeResolver) -> None:
    for address in ("10.0.0.1", "169.254.169.254", "192.168.0.1", "::ffff:10.0.0.1"):
        resolver.table["inside.example"] = [address]
        with pytest.raises(UnsafeURL):
            check_url("http://inside.example/", allow_loopback_http=True)
        with pytest.raises(UnsafeURL):
            check_url("https://inside.example/", allow_loopback_http=True)


def test_credentials_in_the_url_are_refused(resolver: FakeResolver) -> None:
    resolver.table["images.example"] = [PUBLIC_V4]
    with pytest.raises(UnsafeURL, match="credentials"):
        check_url("https://user:pass@images.example/x.png")


def test_unresolvable_hosts_raise_host_not_found(resolver: FakeResolver) -> None:
    with pytest.raises(HostNotFound, match="does not resolve"):
        check_url("https://nowhere.example/x.png")


@pytest.mark.parametrize("url", ["https://", "https:///path", "not a url at all", "https://[::1/"])
def test_malformed_urls_are_refused(resolver: FakeResolver, url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url)


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "017700000001", "127.1"])
def test_numeric_spellings_of_loopback_are_caught(host: str) -> None:
    # The real resolver parses these numerically (inet_aton), so no DNS query leaves the machine.
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url(f"https://{host}/x.png")


def test_blocked_reason_phrases() -> None:
    assert netguard.blocked_reason(PUBLIC_V4) is None
    assert netguard.blocked_reason("127.0.0.1") == "a loopback address"
    assert netguard.blocked_reason("127.0.0.1", allow_loopback=True) is None
    assert netguard.blocked_reason("169.254.169.254", allow_loopback=True) is not None


# --------------------------------------------------------------------------- real requests


LIMIT = 64 * 1024


def test_fetch_returns_the_body(http_server: LoopbackServer) -> None:
    http_server.route("/cat.png")(lambda h: respond(h, 200, b"png-bytes"))
    body = fetch(http_server.url("/cat.png"), max_bytes=LIMIT, allow_loopback_http=True)
    assert body == b"png-bytes"
    request = http_server.requests[-1]
    assert request.headers["Accept-Encoding"] == "identity"
    assert request.headers["Host"] == f"127.0.0.1:{http_server.port}"


def test_fetch_refuses_loopback_without_the_flag(http_server: LoopbackServer) -> None:
    with pytest.raises(UnsafeURL):
        fetch(http_server.url("/cat.png"), max_bytes=LIMIT)
    assert http_server.requests == []


def test_fetch_connects_to_the_checked_address_and_keeps_the_host_header(
    http_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rebinding resolver: safe on the first lookup, internal on any later one.
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.0.0.1"]

    monkeypatch.setattr(netguard, "resolve_host", rebinding)
    http_server.route("/x")(lambda h: respond(h, 200, b"ok"))
    body = fetch(
        f"http://rebind.example:{http_server.port}/x", max_bytes=LIMIT, allow_loopback_http=True
    )
    assert body == b"ok"
    assert calls == ["rebind.example"]  # one lookup: the connection used its answer
    assert http_server.requests[-1].headers["Host"] == f"rebind.example:{http_server.port}"


def test_fetch_tries_the_next_checked_address_when_one_refuses(
    http_server: LoopbackServer, resolver: FakeResolver
) -> None:
    # 127.0.0.2 is loopback too but nothing listens there on this port.
    resolver.table["two.example"] = ["127.0.0.2", "127.0.0.1"]
    http_server.route("/x")(lambda h: respond(h, 200, b"second"))
    url = f"http://two.example:{http_server.port}/x"
    try:
        body = fetch(url, max_bytes=LIMIT, allow_loopback_http=True)
    except FetchError:
        pytest.skip("this kernel answers 127.0.0.2 on the server's port")
    assert body == b"second"


def test_redirects_are_not_followed(http_server: LoopbackServer) -> None:
    http_server.route("/moved")(
        lambda h: respond(h, 302, b"", {"Location": http_server.url("/secret")})
    )
    http_server.route("/secret")(lambda h: respond(h, 200, b"secret"))
    with pytest.raises(BadResponse, match="redirects are not followed") as caught:
        fetch(http_server.url("/moved"), max_bytes=LIMIT, allow_loopback_http=True)
    assert caught.value.status_code == 302
    assert [r.path for r in http_server.requests] == ["/moved"]


def test_error_statuses_are_reported(http_server: LoopbackServer) -> None:
    with pytest.raises(BadResponse, match="404") as caught:
        fetch(http_server.url("/missing"), max_bytes=LIMIT, allow_loopback_http=True)
    assert caught.value.status_code == 404


def test_declared_oversize_is_refused_before_reading(http_server: LoopbackServer) -> None:
    http_server.route("/big")(lambda h: respond(h, 200, b"x" * (LIMIT + 1)))
    with pytest.raises(ResponseTooLarge, match=str(LIMIT)):
        fetch(http_server.url("/big"), max_bytes=LIMIT, allow_loopback_http=True)


def test_undeclared_oversize_is_aborted_while_streaming(http_server: LoopbackServer) -> None:
    http_server.route("/endless")(lambda h: stream_forever(h, b"x" * 8192))
    started = time.monotonic()
    with pytest.raises(ResponseTooLarge, match="larger than the limit"):
        fetch(http_server.url("/endless"), max_bytes=LIMIT, timeout=5, allow_loopback_http=True)
    assert time.monotonic() - started < 5


def test_compressed_bodies_are_refused(http_server: LoopbackServer) -> None:
    import gzip

    payload = gzip.compress(b"\0" * 1_000_000)
    http_server.route("/gz")(lambda h: respond(h, 200, payload, {"Content-Encoding": "gzip"}))
    with pytest.raises(FetchError, match="gzip"):
        fetch(http_server.url("/gz"), max_bytes=LIMIT, allow_loopback_http=True)


def test_a_silent_server_times_out(http_server: LoopbackServer) -> None:
    http_server.route("/slow")(lambda h: (time.sleep(3), respond(h, 200, b"late")))
    started = time.monotonic()
    with pytest.raises(FetchTimeout):
        fetch(http_server.url("/slow"), max_bytes=LIMIT, timeout=0.5, allow_loopback_http=True)
    assert time.monotonic() - started < 2.5


def test_a_trickling_body_hits_the_overall_deadline(http_server: LoopbackServer) -> None:
    # Each chunk arrives within the per-read timeout; only the total deadline stops it.
    http_server.route("/drip")(lambda h: stream_forever(h, b"x", delay=0.2))
    started = time.monotonic()
    with pytest.raises(FetchTimeout, match="did not finish"):
        fetch(http_server.url("/drip"), max_bytes=LIMIT, timeout=1.0, allow_loopback_http=True)
    assert time.monotonic() - started < 3


def test_tls_uses_the_hostname_for_sni_and_verification_while_connecting_to_the_pin(
    https_server: LoopbackServer, resolver: FakeResolver, pki
) -> None:
    resolver.table[TLS_HOSTNAME] = ["127.0.0.1"]
    https_server.route("/cat.png")(lambda h: respond(h, 200, b"over tls"))
    url = https_server.url("/cat.png", host=TLS_HOSTNAME)
    body = fetch(url, max_bytes=LIMIT, allow_loopback_http=True, ssl_context=pki.client_context())
    assert body == b"over tls"
    assert resolver.calls == [TLS_HOSTNAME]
    assert https_server.sni_names == [TLS_HOSTNAME]
    assert https_server.requests[-1].headers["Host"] == f"{TLS_HOSTNAME}:{https_server.port}"


def test_tls_certificate_for_another_name_is_rejected(
    https_server: LoopbackServer, resolver: FakeResolver, pki
) -> None:
    resolver.table["other.masactrl.test"] = ["127.0.0.1"]
    https_server.route("/cat.png")(lambda h: respond(h, 200, b"nope"))
    with pytest.raises(FetchError, match="(?i)certificate|hostname"):
        fetch(
            https_server.url("/cat.png", host="other.masactrl.test"),
            max_bytes=LIMIT,
            allow_loopback_http=True,
            ssl_context=pki.client_context(),
        )
    assert https_server.requests == []


def test_tls_untrusted_ca_is_rejected(https_server: LoopbackServer, resolver: FakeResolver) -> None:
    resolver.table[TLS_HOSTNAME] = ["127.0.0.1"]
    with pytest.raises(FetchError, match="(?i)certificate"):
        fetch(
            https_server.url("/cat.png", host=TLS_HOSTNAME),
            max_bytes=LIMIT,
            allow_loopback_http=True,
        )


# --------------------------------------------------------------------------- webhook POST


def test_post_delivers_the_body_and_headers(http_server: LoopbackServer) -> None:
    http_server.route("/hook")(lambda h: respond(h, 204))
    result = post(
        http_server.url("/hook"),
        b'{"type": "job.succeeded"}',
        {"Content-Type": "application/json", "webhook-id": "msg_1", "Host": "evil.example"},
        timeout=5,
        allow_loopback_http=True,
    )
    assert result.status_code == 204
    status, duration = result
    assert status == 204 and 0 <= duration < 5
    request = http_server.requests[-1]
    assert request.method == "POST"
    assert request.body == b'{"type": "job.succeeded"}'
    assert request.headers["webhook-id"] == "msg_1"
    assert request.headers["Host"] == f"127.0.0.1:{http_server.port}"  # caller cannot override


def test_post_returns_redirects_without_following(http_server: LoopbackServer) -> None:
    http_server.route("/hook")(lambda h: respond(h, 307, b"", {"Location": "/elsewhere"}))
    result = post(http_server.url("/hook"), b"{}", {}, timeout=5, allow_loopback_http=True)
    assert result.status_code == 307
    assert [r.path for r in http_server.requests] == ["/hook"]


def test_post_reads_only_a_little_of_a_huge_response(http_server: LoopbackServer) -> None:
    http_server.route("/hook")(lambda h: stream_forever(h, b"y" * 65536))
    started = time.monotonic()
    result = post(
        http_server.url("/hook"),
        b"{}",
        {},
        timeout=5,
        max_response_bytes=1024,
        allow_loopback_http=True,
    )
    assert result.status_code == 200
    assert time.monotonic() - started < 3


def test_post_times_out(http_server: LoopbackServer) -> None:
    http_server.route("/hook")(lambda h: (time.sleep(3), respond(h, 200)))
    with pytest.raises(FetchTimeout) as caught:
        post(http_server.url("/hook"), b"{}", {}, timeout=0.5, allow_loopback_http=True)
    assert caught.value.duration is not None and caught.value.duration < 2.5


def test_post_refuses_unsafe_targets_without_connecting(resolver: FakeResolver) -> None:
    resolver.table["hooks.example"] = ["169.254.169.254"]
    with pytest.raises(UnsafeURL, match="metadata"):
        post("https://hooks.example/hook", b"{}", {}, timeout=1)


def test_post_reports_a_refused_connection(resolver: FakeResolver) -> None:
    from tests.conftest import free_port

    port = free_port()
    with pytest.raises(FetchError, match="cannot connect"):
        post(f"http://127.0.0.1:{port}/hook", b"{}", {}, timeout=2, allow_loopback_http=True)


# --------------------------------------------------------------------------- literal spellings


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2852039166", "169.254.169.254"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("169.254.43518", "169.254.169.254"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("[::ffff:169.254.169.254]", "169.254.169.254"),
    ],
)
def test_ip_literals_are_read_in_every_spelling(host: str, address: str) -> None:
    literal = netguard.ip_literal(host)
    assert literal is not None
    embedded = getattr(literal, "ipv4_mapped", None) or literal
    assert embedded == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["images.example", "localhost", "a1.example", "0x.example"])
def test_host_names_are_not_literals(host: str) -> None:
    assert netguard.ip_literal(host) is None


@pytest.mark.parametrize("host", ["1.2.3.4.5", "example.0x10", "256.1.1.1", "1.16777216", "08.1"])
def test_numeric_hosts_that_are_no_address_are_refused(host: str) -> None:
    with pytest.raises(UnsafeURL, match="not a valid"):
        netguard.ip_literal(host)


@pytest.mark.parametrize(
    "host", ["2852039166", "0xa9fea9fe", "169.254.43518", "0xa9.0xfe.0xa9.0xfe", "127.1"]
)
def test_submission_check_refuses_numeric_spellings_without_dns(
    resolver: FakeResolver, host: str
) -> None:
    with pytest.raises(UnsafeURL, match="only public addresses"):
        netguard.check_url_syntax(f"https://{host}/hook")
    assert resolver.calls == []


def test_octal_dotted_spelling_is_refused_at_submission(resolver: FakeResolver) -> None:
    # httpx itself refuses to parse it; refused is what matters.
    with pytest.raises(UnsafeURL):
        netguard.check_url_syntax("https://0251.0376.0251.0376/hook")


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped: some stacks route it, some do not
        ("64:ff9b::7f00:1", False),  # NAT64: the gateway, not this host, is contacted
        ("64:ff9b:1::7f00:1", False),  # local-use NAT64
        ("2002:7f00:1::", False),  # 6to4: goes to a relay
        ("::7f00:1", False),  # IPv4-compatible: deprecated
    ],
)
def test_development_loopback_is_127_8_and_ipv6_loopback_only(
    resolver: FakeResolver, address: str, allowed: bool
) -> None:
    host = f"[{address}]" if ":" in address else address
    if allowed:
        assert check_url(f"http://{host}:8000/", allow_loopback_http=True)
    else:
        with pytest.raises(UnsafeURL, match="only public addresses"):
            check_url(f"http://{host}:8000/", allow_loopback_http=True)
        resolver.table["sneaky.example"] = [address]
        with pytest.raises(UnsafeURL):
            check_url("http://sneaky.example/", allow_loopback_http=True)


def test_request_logs_hold_no_query_tokens(
    http_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    http_server.route("/cat.png")(lambda h: respond(h, 200, b"png-bytes"))
    http_server.route("/hook")(lambda h: respond(h, 204, b""))
    with caplog.at_level("INFO", logger="httpx"):
        fetch(
            http_server.url("/cat.png?X-Amz-Signature=s3cr3t-sig"),
            max_bytes=LIMIT,
            allow_loopback_http=True,
        )
        post(http_server.url("/hook?token=s3cr3t-token"), b"{}", {}, allow_loopback_http=True)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "httpx")
    assert "/cat.png" in logged and "/hook" in logged  # the requests are still logged...
    assert "s3cr3t" not in logged  # ...without their tokens


def test_fetch_into_hands_the_body_over_in_chunks(http_server: LoopbackServer) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB: several chunks
    http_server.route("/big.png")(lambda h: respond(h, 200, body))
    chunks: list[bytes] = []
    size = netguard.fetch_into(
        http_server.url("/big.png"), chunks.append, max_bytes=len(body), allow_loopback_http=True
    )
    assert size == len(body)
    assert b"".join(chunks) == body


def test_fetch_into_stops_when_the_sink_refuses(http_server: LoopbackServer) -> None:
    http_server.route("/big.png")(lambda h: respond(h, 200, b"x" * (256 * 1024)))
    received: list[int] = []

    class Full(Exception):
        pass

    def write(chunk: bytes) -> None:
        received.append(len(chunk))
        if sum(received) > 1024:
            raise Full  # a caller's budget: the download ends here, the error is the caller's

    with pytest.raises(Full):
        netguard.fetch_into(
            http_server.url("/big.png"), write, max_bytes=1 << 20, allow_loopback_http=True
        )
    assert sum(received) < 256 * 1024


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTPS://Example.COM/a.png", "https://example.com/a.png"),
        ("https://example.com:443/a.png#top", "https://example.com/a.png"),
        ("https://example.com/a.png?x=1", "https://example.com/a.png?x=1"),
    ],
)
def test_normalized_url_is_what_the_server_receives(url: str, normal: str) -> None:
    assert netguard.normalized_url(url) == normal
