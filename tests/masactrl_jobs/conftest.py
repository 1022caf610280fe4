"""Fixtures for masactrl_jobs: a loopback HTTP(S) server, test certificates and image makers."""

from __future__ import annotations

import contextlib
import datetime
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

MASACTRL_ENV_PREFIX = "MASACTRL_"


# --------------------------------------------------------------------------- loopback server


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1; tests register a handler per path."""

    server: ThreadingHTTPServer
    scheme: str = "http"
    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    sni_names: list[str | None] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def route(self, path: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes[path] = handler
            return handler

        return register


def _make_handler(state: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.requests.append(
                Recorded(self.command, self.path, dict(self.headers.items()), body)
            )
            handler = state.routes.get(self.path.split("?", 1)[0])
            if handler is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            # The client may hang up on purpose (size limit, timeout).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                handler(self)

        do_GET = _dispatch
        do_POST = _dispatch

    return _Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        import sys

        # Clients in these tests hang up on purpose (limits, timeouts); that is not an error.
        if isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def _serve(state: LoopbackServer) -> Iterator[LoopbackServer]:
    thread = threading.Thread(target=state.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.server.shutdown()
        state.server.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def http_server() -> Iterator[LoopbackServer]:
    """A plain-HTTP loopback server."""
    state = LoopbackServer(server=None)  # type: ignore[arg-type]
    state.server = _QuietServer(("127.0.0.1", 0), _make_handler(state))
    yield from _serve(state)


@dataclass
class PKI:
    ca_path: Path
    cert_path: Path
    key_path: Path
    hostname: str

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this test CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))


def make_pki(directory: Path, hostname: str) -> PKI:
    """A throwaway CA and a server certificate for ``hostname`` (no IP SANs on purpose)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "masactrl test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pki = PKI(
        ca_path=directory / "ca.pem",
        cert_path=directory / "server.pem",
        key_path=directory / "server.key",
        hostname=hostname,
    )
    pki.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


TLS_HOSTNAME = "images.masactrl.test"


@pytest.fixture()
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path / "pki", TLS_HOSTNAME)


@pytest.fixture()
def https_server(pki: PKI) -> Iterator[LoopbackServer]:
    """An HTTPS loopback server whose certificate names only ``images.masactrl.test``."""
    state = LoopbackServer(server=None, scheme="https")  # type: ignore[arg-type]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_path, pki.key_path)

    def remember_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        state.sni_names.append(name)

    context.sni_callback = remember_sni  # type: ignore[assignment]

    class _TLSServer(_QuietServer):
        def get_request(self):  # type: ignore[no-untyped-def]
            sock, address = self.socket.accept()
            # Handshake in the request thread, so a failed handshake never stalls the server.
            return context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            ), address

        def finish_request(self, request, client_address):  # type: ignore[no-untyped-def]
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError):
                return
            super().finish_request(request, client_address)

    state.server = _TLSServer(("127.0.0.1", 0), _make_handler(state))
    yield from _serve(state)


def respond(
    handler: BaseHTTPRequestHandler,
    status: int = 200,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    """Send a complete response with a Content-Length."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if body:
        handler.wfile.write(body)


def stream_forever(handler: BaseHTTPRequestHandler, chunk: bytes, delay: float = 0.0) -> None:
    """Answer 200 with a close-delimited body that never ends (until the client hangs up)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        handler.wfile.write(chunk)
        handler.wfile.flush()
        if delay:
            time.sleep(delay)
