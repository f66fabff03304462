"""The /metrics endpoint's request parser (sans-IO): what each request gets."""

from __future__ import annotations

import pytest

from prefork_smtpd.services import HttpMetricsRequest

BODY = b"smtpd_up 1\n"


def answer(*pieces: bytes) -> bytes:
    request = HttpMetricsRequest(lambda: (BODY, "text/plain; version=0.0.4"))
    out = b"".join(request.feed(piece) for piece in pieces)
    assert request.closing == bool(out)
    return out


def status_of(*pieces: bytes) -> int:
    return int(answer(*pieces).split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /metrics HTTP/1.0\r\n\r\n", 200),
        (b"GET /metrics?name[]=smtpd_up HTTP/1.1\r\n\r\n", 200),
        (b"GET /metrics HTTP/1.1\n\n", 200),  # bare line feeds, as curl --raw or nc send
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics HTTP/9.9\r\n\r\n", 505),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET /metr\x00ics HTTP/1.1\r\n\r\n", 400),
        (b"GET\x01 /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /m\xe9trics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.x\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
        # RFC 9112 2.2: an empty line before the request line is ignored (one; two get 400).
        (b"\r\nGET /metrics HTTP/1.1\r\n\r\n", 200),
        (b"\nGET /metrics HTTP/1.1\n\n", 200),
        (b"\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n", 400),
        (b"\r\n\nGET /metrics HTTP/1.1\r\n\r\n", 400),
        # RFC 9112 3.2.2: the absolute form, as a proxy sends it.
        (b"GET http://127.0.0.1:9101/metrics HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n\r\n", 200),
        (b"GET HTTPS://[::1]:9101/metrics?x=1 HTTP/1.1\r\n\r\n", 200),
        (b"GET http://host HTTP/1.1\r\n\r\n", 404),
        (b"GET http://host/other HTTP/1.1\r\n\r\n", 404),
        (b"GET http://host/metrics/x HTTP/1.1\r\n\r\n", 404),
    ],
)
def test_each_request_gets_a_precise_status(request_bytes, status):
    assert status_of(request_bytes) == status
    # the same, split at every byte
    assert status_of(*[request_bytes[i : i + 1] for i in range(len(request_bytes))]) == status


def test_a_get_gets_the_body_a_head_only_its_length():
    get = answer(b"GET /metrics HTTP/1.1\r\n\r\n")
    head = answer(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert get.endswith(b"\r\n\r\n" + BODY) and b"Content-Length: 11\r\n" in get
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 11\r\n" in head
    assert b"Connection: close\r\n" in get


def test_a_request_that_never_ends_its_header_is_refused_past_the_bound():
    request = HttpMetricsRequest(lambda: (BODY, "text/plain"))
    assert request.feed(b"GET /metrics HTTP/1.1\r\n") == b""
    out = b""
    for _ in range(HttpMetricsRequest.MAX_REQUEST // 100 + 2):
        out += request.feed(b"X-Filler: " + b"y" * 88 + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert request.feed(b"more\r\n\r\n") == b""  # answered: the rest is never read
