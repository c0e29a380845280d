"""The WebSocket opening handshake on the bus port, with raw sockets.

What a client observes: a valid upgrade gets 101 with the right
Sec-WebSocket-Accept and may send frames right behind its request; anything
else gets the documented HTTP error (docs/protocol.md, "Connecting"), after
which the server closes the connection, and the refusal is counted in
arqonbus_handshake_errors_total{status}. The connection limit, the handshake
deadline and many slow handshakes at once are checked here too.

An accepted upgrade is proven end to end with protocol v1 (docs/protocol.md,
"Envelopes"): the server's first message is the welcome, and a client that
connected with echo=true and an initial channel gets back the event
envelopes it sends (with neither room nor channel, so they go to the initial
channel). Every envelope received is checked against the published schema.
"""
import asyncio
import json
import select
import socket
import time

import pytest
import websockets

from conftest import SLOW
from envelopes import Bus, check, error_code, query
from rawws import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWS, accept_key, close_payload, frame,
                   padded_upgrade_request, send_bytewise, set_nodelay, still_open, upgrade_request)

HANDSHAKE_ERRORS = 'arqonbus_handshake_errors_total{status="%d"}'
STATUSES = (400, 405, 408, 426, 431, 503)

# The example of RFC 6455 section 1.3.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


ECHO = dict(echo=True, channel="t:echo")
ECHO_PATH = query(**ECHO)


def event(data):
    """The JSON text (bytes) of an event for the initial channel."""
    return json.dumps({"type": "event", "payload": {"data": data}}, separators=(",", ":")).encode()


def recv_welcome(ws, echo=True):
    """Reads the first message of an upgraded RawWS: the welcome. Returns the
    client id the server gave."""
    op, payload = ws.recv_message()
    assert op == OP_TEXT, (op, payload)
    welcome = check(payload)
    assert welcome["type"] == "system" and welcome["payload"]["event"] == "welcome", welcome
    if echo:
        assert welcome["payload"]["echo"] is True, welcome
        assert welcome["payload"]["subscriptions"] == ["t:echo"], welcome
    return welcome["payload"]["client_id"]


def assert_echo(payload, data, client_id):
    """'payload' (a dict, or text) is the routed copy of event(data) from 'client_id'."""
    env = check(payload)
    assert env["type"] == "event", env
    assert env["from"] == client_id, env
    assert (env["room"], env["channel"]) == ("t", "echo"), env
    assert env["payload"] == {"data": data}, "the event came back altered: %.300r" % env


def recv_echo(ws, data, client_id):
    op, payload = ws.recv_message()
    assert op == OP_TEXT, (op, payload[:200])
    assert_echo(payload, data, client_id)


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
    req, key = upgrade_request(path=ECHO_PATH, key=RFC_KEY)
    with RawWS(server.port, upgrade=False) as ws:
        # The request and a first message in one write, as a pipelining client does.
        ws.send(req + frame(OP_TEXT, event("right behind the request")))
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["upgrade"].lower() == "websocket"
        assert headers["connection"].lower() == "upgrade"
        assert headers["sec-websocket-accept"] == RFC_ACCEPT == accept_key(key)
        assert "sec-websocket-extensions" not in headers
        assert "sec-websocket-protocol" not in headers
        # The welcome first, then the event, which comes back to its sender.
        client_id = recv_welcome(ws)
        recv_echo(ws, "right behind the request", client_id)


def test_many_frames_right_behind_the_request(server):
    """More than one read buffer's worth of frames in the request's write,
    ending with a close: all of it is processed in order."""
    big = bytes(range(256)) * 800  # 200 KiB
    big_text = "".join(chr(0x20 + i % 95) for i in range(200 * 1024))  # 200 KiB of printable ASCII
    req, key = upgrade_request(path=ECHO_PATH)
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(req + frame(OP_BINARY, big) + frame(OP_TEXT, event(big_text)) + frame(OP_TEXT, event("second"))
                + frame(OP_PING, "p") + frame(OP_CLOSE, close_payload(1000)))
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        fin, op, payload = ws.recv_frame()
        assert (fin, op) == (True, OP_TEXT)
        welcome = check(payload)
        assert welcome["payload"]["event"] == "welcome", welcome
        client_id = welcome["payload"]["client_id"]
        # The binary message was taken whole (else the frames after it would
        # be garbage): the bus answers that it is not an envelope.
        fin, op, payload = ws.recv_frame()
        assert (fin, op) == (True, OP_TEXT)
        assert error_code(check(payload)) == "unsupported_frame", payload
        fin, op, payload = ws.recv_frame()
        assert (fin, op) == (True, OP_TEXT)
        assert_echo(payload, big_text, client_id)
        fin, op, payload = ws.recv_frame()
        assert (fin, op) == (True, OP_TEXT)
        assert_echo(payload, "second", client_id)
        assert ws.recv_frame() == (True, OP_PONG, b"p")
        assert ws.recv_frame() == (True, OP_CLOSE, close_payload(1000))
        ws.wait_eof(5 * SLOW)


def test_upgrade_request_split_byte_by_byte(server):
    req, key = upgrade_request(path=ECHO_PATH)
    with RawWS(server.port, upgrade=False) as ws:
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, req)
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        client_id = recv_welcome(ws)
        ws.send_frame(OP_TEXT, event("after a trickled request"))
        recv_echo(ws, "after a trickled request", client_id)


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
    # Any path; query parameters other than the identity ones are ignored.
    pytest.param(lambda r: r.replace(b"GET /?", b"GET /any/path?with=query&", 1), id="path-and-query"),
]


@pytest.mark.parametrize("rewrite", ACCEPTED_VARIANTS)
def test_upgrade_variants_are_accepted(server, rewrite):
    req, key = upgrade_request(path=ECHO_PATH)
    variant = rewrite(req)
    assert variant != req, "the variant did not rewrite the request"
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(variant)
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        client_id = recv_welcome(ws)
        ws.send_frame(OP_TEXT, event("variant"))
        recv_echo(ws, "variant", client_id)


def test_64_header_fields_are_accepted(server):
    req, key = _with_fields(64)
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(req)
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        recv_welcome(ws, echo=False)


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
    req, key = padded_upgrade_request(size, path=ECHO_PATH)
    with RawWS(server.port, upgrade=False) as ws:
        ws.send(req + frame(OP_TEXT, event("8 KiB head")))
        status, headers = ws.read_http_head()
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_key(key)
        client_id = recv_welcome(ws)
        recv_echo(ws, "8 KiB head", client_id)


def is_event(data):
    return lambda env: env["type"] == "event" and env["payload"].get("data") == data


def assert_notifications(skipped):
    """Envelopes skipped on the way to an event are channel notifications."""
    for env in skipped:
        assert env["type"] == "system" and env["payload"]["event"] in ("client_joined", "client_left"), env


def test_connection_limit(make_server):
    server = make_server(args=["--max-connections", "3"])
    clients = []
    try:
        # All three in one channel: an event reaches the others, and its sender
        # (echo), so each of them shows that its connection works.
        for _ in range(3):
            clients.append(Bus(server.port, timeout=5 * SLOW, **ECHO))
        before = handshake_errors(server)
        status, headers, body = refused(server, upgrade_request(path=ECHO_PATH)[0])
        assert status == 503
        assert_counted(before, handshake_errors(server), 503)
        # The three that got in still work.
        clients[0].send(event("still here"))
        for c in clients:
            env, skipped = c.recv_until(is_event("still here"))
            assert_echo(env, "still here", clients[0].id)
            assert_notifications(skipped)

        # One leaves with a close handshake; then there is room for another.
        leaving = clients.pop()
        skipped = []
        leaving.ws.send_frame(OP_CLOSE, close_payload(1000))
        assert leaving.ws.expect_close(5 * SLOW, skipped=skipped) == (1000, "")
        assert skipped == [], skipped
        leaving.close()
        server.wait_metric("arqonbus_connections", lambda v: v == 2)
        clients.append(Bus(server.port, timeout=5 * SLOW, **ECHO))
        clients[-1].send(event("newcomer"))
        for c in clients:
            env, skipped = c.recv_until(is_event("newcomer"))
            assert_echo(env, "newcomer", clients[-1].id)
            assert_notifications(skipped)
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


def test_slow_handshakes_do_not_block_others(make_server):
    """200 half-open handshakes (default 10 s timeout) while a good client works.
    They all come from 127.0.0.1, like the good client: the per-address
    bound (max_handshakes_per_ip, test_limits.py) is raised so that this
    tests the event loop, not that bound."""
    server = make_server(args=["--max-handshakes-per-ip", "1000"])
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
            async with websockets.connect(server.url + ECHO_PATH, open_timeout=5 * SLOW) as ws:
                welcome = check(await asyncio.wait_for(ws.recv(), 5 * SLOW))
                assert welcome["payload"]["event"] == "welcome", welcome
                await ws.send(event("through the crowd").decode())
                return welcome["payload"]["client_id"], await asyncio.wait_for(ws.recv(), 5 * SLOW)

        client_id, reply = asyncio.run(good_client())
        assert_echo(reply, "through the crowd", client_id)
        # The default handshake timeout is 10 s: the server must not have
        # dropped any of the slow ones meanwhile.
        assert time.monotonic() - start < 9, "inconclusive: the 10 s handshake timeout may have passed"
        closed = [i for i, s in enumerate(slow) if not still_open(s)]
        assert closed == [], "%d half-open handshakes were closed early" % len(closed)
    finally:
        for s in slow:
            s.close()
