"""The access-log filter redacts a secret query parameter however its name is spelled."""

from __future__ import annotations

import logging

import pytest

from service.redaction import RedactSignatures, redact

SIG = "9f" * 32


@pytest.mark.parametrize(
    "name",
    [
        "signature",
        "SIGNATURE",
        "%73ignature",  # Starlette decodes it to "signature": it downloads the file
        "signatur%65",
        "%53%49%47%4E%41%54%55%52%45",
        "%2573ignature",  # encoded twice
        "X-Amz-Signature",
        "x-amz-%73ignature",
        "X-Amz-Security-Token",
        "x-amz-credential",
    ],
)
def test_a_secret_parameter_is_redacted_whatever_its_spelling(name: str) -> None:
    path = f"/v1/files/results/a.png?expires=1700000000&{name}={SIG}&x=1"
    assert redact(path) == f"/v1/files/results/a.png?expires=1700000000&{name}=REDACTED&x=1"


def test_other_parameters_and_plain_text_are_left_alone() -> None:
    for text in (
        "/v1/jobs?limit=10&cursor=abc",
        "/v1/files/results/a.png?expires=1700000000",
        "127.0.0.1:5000",
        "/v1/jobs?designature=keep&sig=keep",
    ):
        assert redact(text) == text
    assert redact(f"signature={SIG}") == "signature=REDACTED"
    assert redact(f"/a?x=1;%73ignature={SIG}") == "/a?x=1;%73ignature=REDACTED"


def test_the_filter_rewrites_uvicorns_access_log_arguments() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", f"/v1/files/a.png?expires=1&%73ignature={SIG}", "1.1", 200),
        None,
    )
    assert RedactSignatures().filter(record)
    assert SIG not in record.getMessage()
    assert "%73ignature=REDACTED" in record.getMessage()
