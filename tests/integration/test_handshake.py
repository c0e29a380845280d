"""The WebSocket opening handshake on the bus port, with raw sockets.

What a client observes: a valid upgrade gets 101 with the right
Sec-WebSocket-Accept and may send frames right behind its request; anything
else gets the documented HTTP error (docs/protocol.md, "Connecting"), after
which the server closes the connection, and the refusal is counted in
arqonbus_handshake_errors_total{status}. The connection limit, the handshake
deadline and many slow handshakes at once are checked here too.
"""
import asyncio
import select
import socket
import time

import pytest
import websockets

from conftest import SLOW
from rawws import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWS, accept_key, close_payload, frame,
                   padded_upgrade_request, send_bytewise, set_nodelay, still_open, upgrade_request)

HANDSHAKE_ERRORS = 'arqonbus_handshake_errors_total{status="%d"}'
STATUSES = (400, 405, 408, 426, 431, 503)

# The example of RFC 6455 section 1.3.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def handshake_errors(server):
    m = server.metrics()
    return {status: m[HANDSHAKE_ERRORS % status] for status in STATUSES}


def assert_counted(before, after, status):
    """The refusal with 'status' was counted once, and nothing else was."""
    moved = {s: after[s] - before[s] for s in STATUSES if after[s] != before[s]}
    assert moved == {status: 1}, "handshake error counters moved by %r" % moved


def refused(server, request):
    """Sends 'request' (bytes) on a fresh connection; returns (status, headers,
    body) of the answer after checking that the server then closed the connection."""
    with RawWS(server.port, upgrade=False, timeout=5 * SLOW) as ws:
        ws.send(request)
        status, headers, body = ws.read_http_response()
        assert status != 101, "the upgrade was accepted"
        ws.wait_eof(5 * SLOW)
    assert ws.buf == b"", "bytes after the HTTP error response: %r" % ws.buf
    return status, headers, body


def test_valid_upgrade_and_frames_right_behind_the_request(server):
    req, key = upgrade_request(key=RFC_KEY)
    with RawWS(server.port, upgrade=False) as ws:
        # The request and a first message in one write, as a pipelining client does.
        ws.send(req + frame(OP_TEXT, "right behind the request"))
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["upgrade"].lower() == "websocket"
        assert headers["connection"].lower() == "upgrade"
        assert headers["sec-websocket-accept"] == RFC_ACCEPT == accept_key(key)
        assert "sec-websocket-extensions" not in headers
        assert "sec-websocket-protocol" not in headers
        # Every data message goes to every bus client, the sender included.
        assert ws.recv_message() == (OP_TEXT, b"right behind the request")


def test_many_frames_right_behind_the_request(server):
    """More than one read buffer's worth of frames in the request's write,
    ending with a close: all of it is processed in order."""
    big = bytes(range(256)) * 800  # 200 KiB
    req, key = upgrade_request()
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(req + frame(OP_BINARY, big) + frame(OP_TEXT, "second") + frame(OP_PING, "p")
                + frame(OP_CLOSE, close_payload(1000)))
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        assert ws.recv_frame() == (True, OP_BINARY, big)
        assert ws.recv_frame() == (True, OP_TEXT, b"second")
        assert ws.recv_frame() == (True, OP_PONG, b"p")
        assert ws.recv_frame() == (True, OP_CLOSE, close_payload(1000))
        ws.wait_eof(5 * SLOW)


def test_upgrade_request_split_byte_by_byte(server):
    req, key = upgrade_request()
    with RawWS(server.port, upgrade=False) as ws:
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, req)
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        ws.send_frame(OP_TEXT, "after a trickled request")
        assert ws.recv_message() == (OP_TEXT, b"after a trickled request")


def _req(text):
    return text.replace("\n", "\r\n").encode()


def _with_fields(total):
    """An upgrade request with 'total' header fields in all."""
    extra = "".join("X-Field-%d: %d\r\n" % (i, i) for i in range(total - 5))
    return upgrade_request(extra=extra)


ACCEPTED_VARIANTS = [
    pytest.param(lambda r: r.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"),
                 id="connection-token-list"),
    pytest.param(lambda r: r.replace(b"Upgrade: websocket", b"Upgrade: WebSocket").replace(
        b"Connection: Upgrade", b"Connection: upgrade"), id="token-case"),
    pytest.param(lambda r: r.replace(b"Sec-WebSocket-Version: 13", b"sec-websocket-version: 13").replace(
        b"Sec-WebSocket-Key", b"SEC-WEBSOCKET-KEY"), id="field-name-case"),
    pytest.param(lambda r: r.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version:  13  "),
                 id="whitespace-around-value"),
    pytest.param(lambda r: r.replace(b"GET / ", b"GET /any/path?with=query ", 1), id="path-and-query"),
]


@pytest.mark.parametrize("rewrite", ACCEPTED_VARIANTS)
def test_upgrade_variants_are_accepted(server, rewrite):
    req, key = upgrade_request()
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(rewrite(req))
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        ws.send_frame(OP_TEXT, "variant")
        assert ws.recv_message() == (OP_TEXT, b"variant")


def test_64_header_fields_are_accepted(server):
    req, key = _with_fields(64)
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(req)
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)


GOOD_KEY = "x3JJHMbDL1EzLkh9GBhXDw=="
REFUSED = [
    pytest.param(_req("GET / HTTP/1.1\nHost: 127.0.0.1\n\n"), 400, id="plain-get"),
    pytest.param(upgrade_request(version="8")[0], 426, id="version-8"),
    pytest.param(_req("GET / HTTP/1.1\nHost: 127.0.0.1\nUpgrade: websocket\nConnection: Upgrade\n"
                      "Sec-WebSocket-Key: %s\n\n" % GOOD_KEY), 400, id="missing-version"),
    pytest.param(_req("GET / HTTP/1.1\nHost: 127.0.0.1\nUpgrade: websocket\nConnection: Upgrade\n"
                      "Sec-WebSocket-Version: 13\n\n"), 400, id="missing-key"),
    pytest.param(upgrade_request()[0].replace(b"Host: 127.0.0.1\r\n", b""), 400, id="missing-host"),
    pytest.param(upgrade_request()[0].replace(b"Upgrade: websocket", b"Upgrade: h2c"), 400, id="upgrade-h2c"),
    pytest.param(upgrade_request(key="abc")[0], 400, id="key-abc"),
    pytest.param(upgrade_request(key=GOOD_KEY[:23])[0], 400, id="key-23-chars"),
    pytest.param(upgrade_request(key="x3JJHMbDL1EzLkh9GBhX!w==")[0], 400, id="key-not-base64"),
    pytest.param(upgrade_request()[0].replace(b"GET ", b"POST ", 1), 405, id="post"),
    pytest.param(upgrade_request()[0].replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400, id="http-1.0"),
    pytest.param(upgrade_request()[0].replace(b"GET / HTTP/1.1", b"GET / HTTP/1.1 extra", 1), 400,
                 id="malformed-request-line"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400, id="garbage"),
    pytest.param(padded_upgrade_request(8193)[0], 431, id="head-8193"),
    pytest.param(padded_upgrade_request(20000)[0], 431, id="head-20000"),
    pytest.param(_with_fields(65)[0], 431, id="65-header-fields"),
]


@pytest.mark.parametrize("request_bytes,status", REFUSED)
def test_refused_handshake(server, request_bytes, status):
    before = handshake_errors(server)
    got, headers, body = refused(server, request_bytes)
    assert got == status
    assert headers.get("connection", "").lower() == "close"
    assert body.strip(), "the error response should say what was wrong"
    if status == 426:
        assert headers.get("sec-websocket-version") == "13"
    if status == 405:
        assert headers.get("allow") == "GET"
    assert_counted(before, handshake_errors(server), status)


@pytest.mark.parametrize("size", [8191, 8192])
def test_head_up_to_max_header_size_is_accepted(server, size):
    req, key = padded_upgrade_request(size)
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(req + frame(OP_TEXT, "8 KiB head"))
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        assert ws.recv_message() == (OP_TEXT, b"8 KiB head")


def test_connection_limit(make_server):
    server = make_server(args=["--max-connections", "3"])
    clients = [RawWS(server.port) for _ in range(3)]
    try:
        before = handshake_errors(server)
        status, headers, body = refused(server, upgrade_request()[0])
        assert status == 503
        assert_counted(before, handshake_errors(server), 503)
        # The three that got in still work.
        clients[0].send_frame(OP_TEXT, "still here")
        for c in clients:
            assert c.recv_message() == (OP_TEXT, b"still here")

        # One leaves with a close handshake; then there is room for another.
        leaving = clients.pop()
        leaving.send_frame(OP_CLOSE, close_payload(1000))
        assert leaving.expect_close() == (1000, "")
        leaving.close()
        server.wait_metric("arqonbus_connections", lambda v: v == 2)
        clients.append(RawWS(server.port))
        clients[-1].send_frame(OP_TEXT, "newcomer")
        assert clients[-1].recv_message() == (OP_TEXT, b"newcomer")
    finally:
        for c in clients:
            c.close()


def wait_refused_or_closed(ws, deadline):
    """Reads until the server closes; returns the HTTP status it sent first, or
    None when it closed without an answer."""
    ws.sock.settimeout(max(0.1, deadline - time.monotonic()))
    while True:
        try:
            chunk = ws.sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        ws.buf += chunk
    if not ws.buf:
        return None
    assert ws.buf.startswith(b"HTTP/1.1 "), ws.buf[:100]
    return int(ws.buf.split()[1])


def test_handshake_timeout_half_request(make_server):
    server = make_server(args=["--handshake-timeout", "1s"])
    before = handshake_errors(server)
    req, _ = upgrade_request()
    with RawWS(server.port, upgrade=False) as ws:
        start = time.monotonic()
        ws.send(req[:len(req) // 2])
        status = wait_refused_or_closed(ws, start + 1 + 3 * SLOW)
        elapsed = time.monotonic() - start
    assert status in (408, None)
    assert 0.8 <= elapsed < 1 + 3 * SLOW, "closed after %.2f s with a 1 s handshake timeout" % elapsed
    if status == 408:
        assert_counted(before, handshake_errors(server), 408)


def test_handshake_timeout_trickling_client(make_server):
    """A client that keeps sending one byte every 200 ms does not extend the deadline."""
    server = make_server(args=["--handshake-timeout", "1s"])
    before = handshake_errors(server)
    req, _ = upgrade_request(extra="X-Pad: %s\r\n" % ("a" * 100))
    with RawWS(server.port, upgrade=False) as ws:
        start = time.monotonic()
        deadline = start + 1 + 3 * SLOW
        for i in range(len(req) - 1):
            ws.send(req[i:i + 1])
            readable, _, _ = select.select([ws.sock], [], [], 0.2)
            if readable or time.monotonic() > deadline:
                break
        status = wait_refused_or_closed(ws, deadline)
        elapsed = time.monotonic() - start
    assert i < len(req) - 2, "the whole trickled request went through without a timeout"
    assert status in (408, None)
    assert 0.8 <= elapsed < 1 + 3 * SLOW, "closed after %.2f s with a 1 s handshake timeout" % elapsed
    if status == 408:
        assert_counted(before, handshake_errors(server), 408)


def test_slow_handshakes_do_not_block_others(server):
    """200 half-open handshakes (default 10 s timeout) while a good client works."""
    half, _ = upgrade_request()
    half = half[:40]
    slow = []
    start = time.monotonic()
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(half)
            slow.append(s)

        async def good_client():
            async with websockets.connect(server.url, open_timeout=5 * SLOW) as ws:
                await ws.send("through the crowd")
                return await asyncio.wait_for(ws.recv(), 5 * SLOW)

        assert asyncio.run(good_client()) == "through the crowd"
        # The default handshake timeout is 10 s: the server must not have
        # dropped any of the slow ones meanwhile.
        assert time.monotonic() - start < 9, "inconclusive: the 10 s handshake timeout may have passed"
        closed = [i for i, s in enumerate(slow) if not still_open(s)]
        assert closed == [], "%d half-open handshakes were closed early" % len(closed)
    finally:
        for s in slow:
            s.close()
