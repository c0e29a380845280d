"""RFC 6455 frames on the bus port, with hand-built bytes.

Each hostile case checks what the client observes: the close code in the
server's close frame, the end of the TCP connection right after it, and the
violation counted once in arqonbus_protocol_errors_total{code}. The good
cases rely on the interim routing (docs/protocol.md, "Messages"): every data
message comes back to its sender, so an echo proves the server took it whole.
"""
import asyncio
import os
import time

import pytest
import websockets

from conftest import SLOW
from rawws import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS, close_payload, frame,
                   parse_close, send_bytewise, set_nodelay)

PROTOCOL_ERRORS = 'arqonbus_protocol_errors_total{code="%d"}'
CODES = (1002, 1007, 1009)


def protocol_errors(server):
    m = server.metrics()
    return {code: m[PROTOCOL_ERRORS % code] for code in CODES}


def expect_violation(server, data, code):
    """Sends 'data' on a fresh connection and checks that the server closes
    it with 'code', ends the TCP connection, and counts the violation once."""
    before = protocol_errors(server)
    with RawWS(server.port, timeout=5 * SLOW) as ws:
        ws.send(data)
        got, reason = ws.expect_close(timeout=5 * SLOW)
        assert got == code, "closed with %r (%r), expected %d" % (got, reason, code)
        assert reason, "a protocol error close should say what was wrong"
        ws.wait_eof(5 * SLOW)
    after = protocol_errors(server)
    moved = {c: after[c] - before[c] for c in CODES if after[c] != before[c]}
    assert moved == {code: 1}, "protocol error counters moved by %r" % moved


# ---- protocol errors: 1002 ---------------------------------------------------

PROTOCOL_VIOLATIONS = [
    pytest.param(frame(OP_TEXT, "hi", mask=False), id="unmasked"),
    pytest.param(frame(OP_PING, mask=False), id="unmasked-ping"),
    pytest.param(frame(OP_TEXT, "hi", rsv=4), id="rsv1"),
    pytest.param(frame(OP_TEXT, "hi", rsv=2), id="rsv2"),
    pytest.param(frame(OP_TEXT, "hi", rsv=1), id="rsv3"),
    pytest.param(frame(OP_CONT, "hi", rsv=4), id="rsv1-continuation"),
] + [
    pytest.param(frame(op, "hi"), id="opcode-0x%X" % op) for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
] + [
    pytest.param(frame(OP_PING, b"p" * 126), id="ping-126-bytes"),
    pytest.param(frame(OP_PONG, b"p" * 126), id="pong-126-bytes"),
    pytest.param(frame(OP_PING, b"ping", fin=False), id="fragmented-ping"),
    pytest.param(frame(OP_CLOSE, close_payload(1000), fin=False), id="fragmented-close"),
    pytest.param(frame(OP_CONT, "orphan"), id="continuation-without-start"),
    pytest.param(frame(OP_CONT, "orphan", fin=False), id="open-continuation-without-start"),
    pytest.param(frame(OP_TEXT, "one", fin=False) + frame(OP_TEXT, "two"), id="text-inside-fragmented"),
    pytest.param(frame(OP_BINARY, "one", fin=False) + frame(OP_BINARY, "two", fin=False),
                 id="binary-inside-fragmented"),
    pytest.param(frame(OP_TEXT, "whole") + frame(OP_CONT, "orphan"), id="continuation-after-whole-message"),
    pytest.param(frame(OP_BINARY, length=1 << 63), id="64-bit-length-top-bit"),
    pytest.param(frame(OP_BINARY, length=(1 << 64) - 1), id="64-bit-length-all-ones"),
]


@pytest.mark.parametrize("data", PROTOCOL_VIOLATIONS)
def test_protocol_violation_closes_with_1002(server, data):
    expect_violation(server, data, 1002)


def test_protocol_violation_after_good_messages(server):
    """Messages before the violation are delivered; the violation still closes."""
    before = protocol_errors(server)
    with RawWS(server.port) as ws:
        ws.send(frame(OP_TEXT, "first") + frame(OP_BINARY, b"\x00second"))
        assert ws.recv_message() == (OP_TEXT, b"first")
        assert ws.recv_message() == (OP_BINARY, b"\x00second")
        ws.send(frame(OP_TEXT, "bad", mask=False))
        assert ws.expect_close()[0] == 1002
        ws.wait_eof(5 * SLOW)
    assert protocol_errors(server)[1002] == before[1002] + 1


# ---- message size: 1009 ----------------------------------------------------

@pytest.fixture
def small_server(make_server):
    return make_server(args=["--max-message-size", "1024"])


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_message_of_exactly_the_limit_is_accepted(small_server, opcode):
    payload = b"m" * 1024
    with RawWS(small_server.port) as ws:
        ws.send_frame(opcode, payload)
        assert ws.recv_message() == (opcode, payload)


def test_fragments_totalling_the_limit_are_accepted(small_server):
    with RawWS(small_server.port) as ws:
        ws.send(frame(OP_TEXT, b"a" * 512, fin=False) + frame(OP_CONT, b"b" * 511, fin=False)
                + frame(OP_CONT, b"c"))
        assert ws.recv_message() == (OP_TEXT, b"a" * 512 + b"b" * 511 + b"c")


OVERSIZE = [
    pytest.param(frame(OP_TEXT, b"m" * 1025), id="1025-bytes"),
    pytest.param(frame(OP_BINARY, b"m" * 1025), id="1025-bytes-binary"),
    pytest.param(frame(OP_BINARY, length=1 << 30), id="1-GiB-header-only"),
    pytest.param(frame(OP_BINARY, length=70000), id="64-bit-length-header-only"),
    pytest.param(frame(OP_TEXT, b"a" * 512, fin=False) + frame(OP_CONT, b"b" * 513), id="fragments-1025"),
    pytest.param(frame(OP_TEXT, b"a" * 1024, fin=False) + frame(OP_CONT, b"b"), id="fragments-1024+1"),
    pytest.param(frame(OP_TEXT, b"a" * 1000, fin=False) + frame(OP_CONT, length=1 << 30),
                 id="fragment-header-only-over-total"),
]


@pytest.mark.parametrize("data", OVERSIZE)
def test_message_over_the_limit_closes_with_1009(small_server, data):
    expect_violation(small_server, data, 1009)


def test_announced_huge_frame_is_refused_before_its_payload(small_server):
    """The header alone of a 1 GiB frame is enough: the server does not wait for
    the payload (which never comes) before closing."""
    with RawWS(small_server.port) as ws:
        ws.send(frame(OP_BINARY, length=1 << 30))
        assert ws.expect_close(timeout=3 * SLOW)[0] == 1009
        ws.wait_eof(3 * SLOW)


def _default_limit_roundtrip(url, size):
    async def run():
        async with websockets.connect(url, max_size=None, open_timeout=5 * SLOW) as ws:
            payload = os.urandom(size)
            await ws.send(payload)
            try:
                echoed = await asyncio.wait_for(ws.recv(), 10 * SLOW)
            except websockets.ConnectionClosed:
                echoed = None
            if echoed is None:
                return None, ws.close_code
            return echoed == payload, None
    return asyncio.run(run())


def test_default_limit_accepts_exactly_1_mib(server):
    ok, code = _default_limit_roundtrip(server.url, 1048576)
    assert code is None, "closed with %r" % code
    assert ok, "the 1 MiB message came back altered"


def test_default_limit_refuses_1_mib_plus_one(server):
    before = protocol_errors(server)
    ok, code = _default_limit_roundtrip(server.url, 1048577)
    assert code == 1009
    assert protocol_errors(server)[1009] == before[1009] + 1


# ---- UTF-8: 1007 -----------------------------------------------------------

GRINNING = "\U0001F600".encode()  # f0 9f 98 80


@pytest.mark.parametrize("payload", [
    pytest.param(b"\xff", id="ff"),
    pytest.param(b"ok \xc0\xaf", id="overlong"),
    pytest.param(b"\xed\xa0\x80", id="surrogate"),
    pytest.param(b"\xf4\x90\x80\x80", id="above-10ffff"),
    pytest.param(b"abc\x80def", id="lone-continuation"),
    pytest.param(b"long ascii run " * 10 + b"\xfe", id="after-ascii-run"),
])
def test_invalid_utf8_text_closes_with_1007(server, payload):
    expect_violation(server, frame(OP_TEXT, payload), 1007)


def test_invalid_utf8_is_fine_in_binary(server):
    with RawWS(server.port) as ws:
        ws.send_frame(OP_BINARY, b"\xff\xfe\xed\xa0\x80")
        assert ws.recv_message() == (OP_BINARY, b"\xff\xfe\xed\xa0\x80")


@pytest.mark.parametrize("split", [1, 2, 3])
def test_code_point_split_across_fragments_is_accepted(server, split):
    text = b"smile " + GRINNING + b" ok"
    cut = 6 + split
    with RawWS(server.port) as ws:
        ws.send(frame(OP_TEXT, text[:cut], fin=False) + frame(OP_CONT, text[cut:]))
        assert ws.recv_message() == (OP_TEXT, text)


@pytest.mark.parametrize("frames,expected", [
    pytest.param([(OP_TEXT, b"", False), (OP_CONT, b"x", True)], (OP_TEXT, b"x"), id="empty-first"),
    pytest.param([(OP_BINARY, b"a", False), (OP_CONT, b"", False), (OP_CONT, b"", False), (OP_CONT, b"b", True)],
                 (OP_BINARY, b"ab"), id="empty-middle"),
    pytest.param([(OP_TEXT, b"", False), (OP_CONT, b"", False), (OP_CONT, b"", True)], (OP_TEXT, b""),
                 id="all-empty"),
])
def test_empty_fragments(server, frames, expected):
    with RawWS(server.port) as ws:
        ws.send(b"".join(frame(op, payload, fin=fin) for op, payload, fin in frames))
        assert ws.recv_message() == expected
        ws.send_frame(OP_TEXT, "next")
        assert ws.recv_message() == (OP_TEXT, b"next")


def test_code_point_split_across_three_fragments_is_accepted(server):
    with RawWS(server.port) as ws:
        ws.send(frame(OP_TEXT, GRINNING[:1], fin=False) + frame(OP_CONT, GRINNING[1:3], fin=False)
                + frame(OP_CONT, GRINNING[3:]))
        assert ws.recv_message() == (OP_TEXT, GRINNING)


UTF8_FRAGMENT_ERRORS = [
    pytest.param(frame(OP_TEXT, b"x\xf0\x9f", fin=False) + frame(OP_CONT, b"A"), id="bad-continuation"),
    pytest.param(frame(OP_TEXT, b"x\xf0", fin=False) + frame(OP_CONT, b"\x80\x80\x80"), id="overlong-split"),
    pytest.param(frame(OP_TEXT, b"x\xed", fin=False) + frame(OP_CONT, b"\xa0\x80"), id="surrogate-split"),
    pytest.param(frame(OP_TEXT, b"a\xf0\x9f"), id="ends-inside-code-point"),
    pytest.param(frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"\xf0\x9f\x98"), id="fragments-end-inside"),
    pytest.param(frame(OP_TEXT, b"a\xf0\x9f", fin=False) + frame(OP_CONT, b""), id="empty-last-fragment"),
]


@pytest.mark.parametrize("data", UTF8_FRAGMENT_ERRORS)
def test_invalid_utf8_across_fragments_closes_with_1007(server, data):
    expect_violation(server, data, 1007)


# ---- close frames ----------------------------------------------------------

@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_code_closes_with_1002(server, code):
    expect_violation(server, frame(OP_CLOSE, close_payload(code)), 1002)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])
def test_valid_close_code_is_echoed(server, code):
    before = protocol_errors(server)
    with RawWS(server.port) as ws:
        ws.send_frame(OP_CLOSE, close_payload(code, "bye \u00e9".encode()))
        got, _ = ws.expect_close()
        assert got == code
        ws.wait_eof(5 * SLOW)
    assert protocol_errors(server) == before


def test_close_with_one_byte_payload_closes_with_1002(server):
    expect_violation(server, frame(OP_CLOSE, b"\x03"), 1002)


def test_close_reason_invalid_utf8_closes_with_1007(server):
    expect_violation(server, frame(OP_CLOSE, close_payload(1000, b"bad \xff")), 1007)


def test_empty_close_gets_a_close_back(server):
    with RawWS(server.port) as ws:
        ws.send_frame(OP_CLOSE)
        while True:
            fin, op, payload = ws.recv_frame()
            if op == OP_CLOSE:
                break
            assert op == OP_PING, "unexpected frame %r before the close" % op
        assert parse_close(payload)[0] in (None, 1000), payload
        ws.wait_eof(5 * SLOW)


def test_close_between_fragments_is_answered(server):
    """A close inside a fragmented message ends it: the unfinished message is
    never delivered."""
    with RawWS(server.port) as ws:
        ws.send(frame(OP_TEXT, "never", fin=False) + frame(OP_CLOSE, close_payload(1000)))
        ops = []
        while True:
            fin, op, payload = ws.recv_frame()
            ops.append(op)
            if op == OP_CLOSE:
                break
        assert parse_close(payload)[0] == 1000
        assert OP_TEXT not in ops and OP_CONT not in ops
        ws.wait_eof(5 * SLOW)


# ---- ping, pong, fragments ---------------------------------------------------

@pytest.mark.parametrize("payload", [b"hello", b"", b"\x00\xff" * 62 + b"!"])
def test_ping_gets_pong_with_same_payload(server, payload):
    with RawWS(server.port) as ws:
        ws.send_frame(OP_PING, payload)
        fin, op, got = ws.recv_frame()
        assert (fin, op, got) == (True, OP_PONG, payload)


def test_unsolicited_pong_is_ignored(server):
    with RawWS(server.port) as ws:
        ws.send(frame(OP_PONG, "unasked") + frame(OP_TEXT, "still fine"))
        assert ws.recv_frame() == (True, OP_TEXT, b"still fine")


INTERLEAVED = (frame(OP_TEXT, "Hel", fin=False) + frame(OP_PING, "p1") + frame(OP_CONT, "lo, ", fin=False)
               + frame(OP_PONG, "unasked") + frame(OP_PING, "p2") + frame(OP_CONT, "world"))


@pytest.mark.parametrize("how", ["one-write", "frame-per-write"])
def test_pings_between_fragments(server, how):
    with RawWS(server.port) as ws:
        if how == "one-write":
            ws.send(INTERLEAVED)
        else:
            set_nodelay(ws.sock)
            ws.send(frame(OP_TEXT, "Hel", fin=False))
            time.sleep(0.02)
            ws.send(frame(OP_PING, "p1"))
            time.sleep(0.02)
            ws.send(frame(OP_CONT, "lo, ", fin=False))
            time.sleep(0.02)
            ws.send(frame(OP_PONG, "unasked"))
            ws.send(frame(OP_PING, "p2"))
            time.sleep(0.02)
            ws.send(frame(OP_CONT, "world"))
        assert ws.recv_frame() == (True, OP_PONG, b"p1")
        assert ws.recv_frame() == (True, OP_PONG, b"p2")
        assert ws.recv_frame() == (True, OP_TEXT, b"Hello, world")
        # Exactly once.
        ws.send_frame(OP_TEXT, "marker")
        assert ws.recv_frame() == (True, OP_TEXT, b"marker")


# ---- split reads ------------------------------------------------------------

@pytest.mark.parametrize("data,expected", [
    pytest.param(frame(OP_TEXT, "hello"), [(OP_TEXT, b"hello")], id="short-text"),
    pytest.param(frame(OP_TEXT, "\u00e9t\u00e9 " + "x" * 130), [(OP_TEXT, ("\u00e9t\u00e9 " + "x" * 130).encode())],
                 id="16-bit-length"),
    pytest.param(frame(OP_TEXT, GRINNING[:2], fin=False) + frame(OP_PING, "p") + frame(OP_CONT, GRINNING[2:]),
                 [(OP_PONG, b"p"), (OP_TEXT, GRINNING)], id="fragments-and-ping"),
    pytest.param(frame(OP_BINARY, b"") + frame(OP_TEXT, "after empty"),
                 [(OP_BINARY, b""), (OP_TEXT, b"after empty")], id="empty-frame"),
    pytest.param(frame(OP_PING, b"z" * 125), [(OP_PONG, b"z" * 125)], id="ping-125-bytes"),
    pytest.param(frame(OP_CLOSE, close_payload(4000, b"split")), [(OP_CLOSE, b"\x0f\xa0")], id="close"),
])
def test_frames_split_byte_by_byte(server, data, expected):
    with RawWS(server.port) as ws:
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, data)
        got = [ws.recv_message(skip_pings=False)[0:2] for _ in expected]
        assert got == expected


def test_64_bit_length_frame_with_split_header(server):
    payload = os.urandom(70000)
    data = frame(OP_BINARY, payload)
    with RawWS(server.port) as ws:
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, data[:14])
        for i in range(14, len(data), 7001):
            ws.send(data[i:i + 7001])
        assert ws.recv_message() == (OP_BINARY, payload)


def test_invalid_frame_split_byte_by_byte(server):
    data = frame(OP_TEXT, b"ab\xf0\x9f\x98\x80\xff")
    before = protocol_errors(server)
    with RawWS(server.port) as ws:
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, data)
        assert ws.expect_close()[0] == 1007
        ws.wait_eof(5 * SLOW)
    assert protocol_errors(server)[1007] == before[1007] + 1


# ---- the close deadline -------------------------------------------------------

def test_protocol_error_close_does_not_wait_for_the_client(server):
    """A client that never answers the server's close frame: the server shuts
    down its side at once and releases the connection within close_timeout
    (2 s by default) although the client keeps its socket open."""
    limit = 2 + 1.5 * SLOW
    with RawWS(server.port) as ws:
        server.wait_metric("arqonbus_connections", lambda v: v == 1)
        start = time.monotonic()
        ws.send_frame(OP_TEXT, "unmasked", mask=False)
        assert ws.expect_close()[0] == 1002
        ws.wait_eof(limit)
        assert time.monotonic() - start < limit
        while server.metrics()["arqonbus_connections"] != 0:
            assert time.monotonic() - start < limit, "the server still holds the connection"
            time.sleep(0.05)
    closed = server.metrics()['arqonbus_connections_closed_total{reason="protocol_error"}']
    assert closed == 1
