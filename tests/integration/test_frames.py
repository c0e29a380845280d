"""RFC 6455 frames on the bus port, with hand-built bytes.

Each hostile case checks what the client observes: the close code in the
server's close frame, the end of the TCP connection right after it, and the
violation counted once in arqonbus_protocol_errors_total{code}. Everything
the server sent before its close frame is checked too: the welcome first,
and only envelopes that match the published schema.

The good cases speak protocol v1 (docs/protocol.md, "Envelopes"): the client
connects with echo=true and an initial channel and sends event envelopes
with neither room nor channel, which the server routes back to their sender
with id, timestamp and from filled in. An event that comes back with the
same payload.data proves that the server took the message whole; a binary
message, which the transport accepts, is answered with an unsupported_frame
error envelope instead of being echoed.
"""
import asyncio
import json
import random
import time

import pytest
import websockets

from conftest import SLOW
from envelopes import Bus, check, error_code, query
from rawws import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS, close_payload, frame,
                   parse_close, send_bytewise, set_nodelay)
from wsutil import type_deltas

PROTOCOL_ERRORS = 'arqonbus_protocol_errors_total{code="%d"}'
CODES = (1002, 1007, 1009)
RECEIVED = "arqonbus_messages_received_total"
DELIVERED = "arqonbus_messages_delivered_total"

ECHO = dict(echo=True, channel="t:echo")
ECHO_PATH = query(**ECHO)


def protocol_errors(server):
    m = server.metrics()
    return {code: m[PROTOCOL_ERRORS % code] for code in CODES}


def event(data):
    """The JSON text (bytes) of an event for the initial channel, compact, with
    non-ASCII characters as raw UTF-8 so that they can be split across frames."""
    return json.dumps({"type": "event", "payload": {"data": data}}, ensure_ascii=False,
                      separators=(",", ":")).encode()


def sized_event(size):
    """An event whose JSON text is exactly 'size' bytes, padded in payload.data."""
    base = len(event(""))
    assert size >= base
    data = event("x" * (size - base))
    assert len(data) == size
    return data


def echo_bus(server, timeout=None):
    """A client that gets its own events back (it has read and checked the welcome)."""
    bus = Bus(server.port, timeout=timeout or 5 * SLOW, **ECHO)
    assert bus.welcome["payload"]["echo"] is True, bus.welcome
    assert bus.welcome["payload"]["subscriptions"] == ["t:echo"], bus.welcome
    return bus


def assert_echo(env, data, client_id):
    """'env' (a dict, or the payload of a text frame) is the routed copy of an
    event(data) sent by 'client_id'."""
    env = check(env)
    assert env["type"] == "event", env
    assert env["from"] == client_id, env
    assert (env["room"], env["channel"]) == ("t", "echo"), env
    assert env["payload"] == {"data": data}, "the event came back altered: %.300r" % env


def assert_error(env, code):
    env = check(env)
    assert error_code(env) == code, env
    return env


def check_skipped(skipped):
    """What the server sent before its close frame: the welcome first, and only
    text frames that are valid envelopes."""
    assert skipped, "no welcome before the close"
    for op, payload in skipped:
        assert op == OP_TEXT, "data frame with opcode %r before the close: %.200r" % (op, payload)
        check(payload)
    welcome = check(skipped[0][1])
    assert welcome["type"] == "system" and welcome["payload"]["event"] == "welcome", welcome


def expect_violation(server, data, code):
    """Sends 'data' on a fresh connection and checks that the server closes
    it with 'code', ends the TCP connection, and counts the violation once."""
    before = protocol_errors(server)
    skipped = []
    with RawWS(server.port, timeout=5 * SLOW) as ws:
        ws.send(data)
        got, reason = ws.expect_close(timeout=5 * SLOW, skipped=skipped)
        assert got == code, "closed with %r (%r), expected %d" % (got, reason, code)
        assert reason, "a protocol error close should say what was wrong"
        ws.wait_eof(5 * SLOW)
    check_skipped(skipped)
    after = protocol_errors(server)
    moved = {c: after[c] - before[c] for c in CODES if after[c] != before[c]}
    assert moved == {code: 1}, "protocol error counters moved by %r" % moved


def test_helpers_build_exact_envelopes():
    """The byte-exact builders below are what the size tests rely on."""
    assert sized_event(1024) == b'{"type":"event","payload":{"data":"' + b"x" * 986 + b'"}}'
    assert len(event("\U0001F600")) == len(event("")) + 4


# ---- protocol errors: 1002 ---------------------------------------------------

PING_COMMAND = b'{"type":"command","command":"ping"}'

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
    pytest.param(frame(OP_TEXT, PING_COMMAND) + frame(OP_CONT, "orphan"), id="continuation-after-whole-message"),
    pytest.param(frame(OP_BINARY, length=1 << 63), id="64-bit-length-top-bit"),
    pytest.param(frame(OP_BINARY, length=(1 << 64) - 1), id="64-bit-length-all-ones"),
]


@pytest.mark.parametrize("data", PROTOCOL_VIOLATIONS)
def test_protocol_violation_closes_with_1002(server, data):
    expect_violation(server, data, 1002)


def test_protocol_violation_after_good_messages(server):
    """Messages before the violation are taken and answered; the violation
    still closes."""
    before = protocol_errors(server)
    with echo_bus(server) as bus:
        start = server.metrics()
        bus.ws.send(frame(OP_TEXT, event("first")) + frame(OP_BINARY, b"\x00second"))
        assert_echo(bus.recv(), "first", bus.id)
        assert_error(bus.recv(), "unsupported_frame")
        bus.ws.send(frame(OP_TEXT, event("bad"), mask=False))
        skipped = []
        assert bus.ws.expect_close(5 * SLOW, skipped=skipped)[0] == 1002
        assert skipped == [], "the unmasked message was answered: %r" % skipped
        bus.ws.wait_eof(5 * SLOW)
    assert protocol_errors(server)[1002] == before[1002] + 1
    m = server.metrics()
    # The event and the binary message (invalid); not the unmasked frame.
    assert type_deltas(start, m, RECEIVED) == {"event": 1, "invalid": 1}
    # The echo and the error (the welcome was counted before).
    assert type_deltas(start, m, DELIVERED) == {"event": 1, "error": 1}


# ---- message size: 1009 ----------------------------------------------------

@pytest.fixture
def small_server(make_server):
    """A 1024-byte transport limit; the envelope limit is out of the way, so a
    message that the transport accepts is a valid envelope and comes back."""
    return make_server(args=["--max-message-size", "1024", "--max-envelope-size", "64MiB"])


def test_text_message_of_exactly_the_limit_is_accepted(small_server):
    data = sized_event(1024)
    with echo_bus(small_server) as bus:
        bus.ws.send_frame(OP_TEXT, data)
        assert_echo(bus.recv(), json.loads(data)["payload"]["data"], bus.id)


def test_binary_message_of_exactly_the_limit_is_accepted(small_server):
    """The transport takes it whole (no 1009, and the next frame is read in
    step); the bus answers that binary messages are not envelopes."""
    before = protocol_errors(small_server)
    with echo_bus(small_server) as bus:
        bus.ws.send(frame(OP_BINARY, b"m" * 1024) + frame(OP_TEXT, event("after binary")))
        assert_error(bus.recv(), "unsupported_frame")
        assert_echo(bus.recv(), "after binary", bus.id)
    assert protocol_errors(small_server) == before


def test_fragments_totalling_the_limit_are_accepted(small_server):
    data = sized_event(1024)
    with echo_bus(small_server) as bus:
        bus.ws.send(frame(OP_TEXT, data[:512], fin=False) + frame(OP_CONT, data[512:1023], fin=False)
                    + frame(OP_CONT, data[1023:]))
        assert_echo(bus.recv(), json.loads(data)["payload"]["data"], bus.id)


OVER = sized_event(1025)
OVERSIZE = [
    pytest.param(frame(OP_TEXT, OVER), id="1025-bytes"),
    pytest.param(frame(OP_BINARY, b"m" * 1025), id="1025-bytes-binary"),
    pytest.param(frame(OP_BINARY, length=1 << 30), id="1-GiB-header-only"),
    pytest.param(frame(OP_BINARY, length=70000), id="64-bit-length-header-only"),
    pytest.param(frame(OP_TEXT, OVER[:512], fin=False) + frame(OP_CONT, OVER[512:]), id="fragments-1025"),
    pytest.param(frame(OP_TEXT, OVER[:1024], fin=False) + frame(OP_CONT, OVER[1024:]), id="fragments-1024+1"),
    pytest.param(frame(OP_TEXT, OVER[:1000], fin=False) + frame(OP_CONT, length=1 << 30),
                 id="fragment-header-only-over-total"),
]


@pytest.mark.parametrize("data", OVERSIZE)
def test_message_over_the_limit_closes_with_1009(small_server, data):
    expect_violation(small_server, data, 1009)


def test_announced_huge_frame_is_refused_before_its_payload(small_server):
    """The header alone of a 1 GiB frame is enough: the server does not wait for
    the payload (which never comes) before closing."""
    skipped = []
    with RawWS(small_server.port) as ws:
        ws.send(frame(OP_BINARY, length=1 << 30))
        assert ws.expect_close(timeout=3 * SLOW, skipped=skipped)[0] == 1009
        ws.wait_eof(3 * SLOW)
    check_skipped(skipped)


def _default_limit_roundtrip(url, size):
    """Sends an event of exactly 'size' bytes with a third-party client; returns
    (the envelope that came back, None) or (None, the close code)."""
    async def run():
        async with websockets.connect(url + ECHO_PATH, max_size=None, open_timeout=5 * SLOW) as ws:
            welcome = check(await asyncio.wait_for(ws.recv(), 5 * SLOW))
            assert welcome["payload"]["event"] == "welcome", welcome
            await ws.send(sized_event(size).decode())
            try:
                reply = await asyncio.wait_for(ws.recv(), 10 * SLOW)
            except websockets.ConnectionClosed:
                return None, ws.close_code
            reply = check(reply)
            if reply["type"] == "error":
                # The connection stays open: the next event comes back.
                await ws.send(event("still open").decode())
                assert_echo(await asyncio.wait_for(ws.recv(), 5 * SLOW), "still open", welcome["payload"]["client_id"])
            else:
                assert_echo(reply, "x" * (size - len(event(""))), welcome["payload"]["client_id"])
            return reply, None
    return asyncio.run(run())


def test_default_limit_accepts_exactly_1_mib(make_server):
    server = make_server(args=["--max-envelope-size", "64MiB"])
    reply, code = _default_limit_roundtrip(server.url, 1048576)
    assert code is None, "closed with %r" % code
    assert reply["type"] == "event", reply


def test_default_limits_take_1_mib_as_too_large_an_envelope(server):
    """With the default envelope limit (512 KiB) the transport still takes a
    1 MiB message; the bus refuses it with payload_too_large and the
    connection stays open."""
    before = protocol_errors(server)
    reply, code = _default_limit_roundtrip(server.url, 1048576)
    assert code is None, "closed with %r" % code
    assert_error(reply, "payload_too_large")
    assert protocol_errors(server) == before


@pytest.mark.parametrize("args", [pytest.param([], id="default-envelope-limit"),
                                  pytest.param(["--max-envelope-size", "64MiB"], id="envelope-limit-64MiB")])
def test_default_limit_refuses_1_mib_plus_one(make_server, args):
    server = make_server(args=args)
    before = protocol_errors(server)
    reply, code = _default_limit_roundtrip(server.url, 1048577)
    assert code == 1009, "got %.300r" % (reply,)
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


def test_invalid_utf8_in_envelope_closes_with_1007(server):
    """JSON that would be a valid envelope but for one byte is still refused by
    the transport, before the bus sees it."""
    data = event("caf\u00e9").replace("\u00e9".encode(), b"\xe9")
    expect_violation(server, frame(OP_TEXT, data), 1007)


def test_invalid_utf8_is_fine_in_binary(server):
    """Binary messages are not checked for UTF-8: no 1007, the connection stays
    open, and the bus answers unsupported_frame."""
    before = protocol_errors(server)
    with echo_bus(server) as bus:
        bus.ws.send(frame(OP_BINARY, b"\xff\xfe\xed\xa0\x80") + frame(OP_TEXT, event("after")))
        assert_error(bus.recv(), "unsupported_frame")
        assert_echo(bus.recv(), "after", bus.id)
    assert protocol_errors(server) == before


SMILE = "smile \U0001F600 ok"


@pytest.mark.parametrize("split", [1, 2, 3])
def test_code_point_split_across_fragments_is_accepted(server, split):
    data = event(SMILE)
    cut = data.index(GRINNING) + split
    with echo_bus(server) as bus:
        bus.ws.send(frame(OP_TEXT, data[:cut], fin=False) + frame(OP_CONT, data[cut:]))
        assert_echo(bus.recv(), SMILE, bus.id)


def _empty_fragment_cases():
    e = event("empty fragments")
    return [
        pytest.param([(OP_TEXT, b"", False), (OP_CONT, e, True)], ("echo", "empty fragments"), id="empty-first"),
        pytest.param([(OP_TEXT, e[:9], False), (OP_CONT, b"", False), (OP_CONT, b"", False), (OP_CONT, e[9:], True)],
                     ("echo", "empty fragments"), id="empty-middle"),
        pytest.param([(OP_TEXT, e, False), (OP_CONT, b"", True)], ("echo", "empty fragments"), id="empty-last"),
        pytest.param([(OP_BINARY, b"a", False), (OP_CONT, b"", False), (OP_CONT, b"", False), (OP_CONT, b"b", True)],
                     ("error", "unsupported_frame"), id="empty-middle-binary"),
        # An empty text message is taken (as an empty message, which is not JSON).
        pytest.param([(OP_TEXT, b"", False), (OP_CONT, b"", False), (OP_CONT, b"", True)],
                     ("error", "invalid_json"), id="all-empty"),
    ]


@pytest.mark.parametrize("frames,expected", _empty_fragment_cases())
def test_empty_fragments(server, frames, expected):
    with echo_bus(server) as bus:
        bus.ws.send(b"".join(frame(op, payload, fin=fin) for op, payload, fin in frames))
        kind, value = expected
        if kind == "echo":
            assert_echo(bus.recv(), value, bus.id)
        else:
            assert_error(bus.recv(), value)
        bus.ws.send_frame(OP_TEXT, event("next"))
        assert_echo(bus.recv(), "next", bus.id)


def test_code_point_split_across_three_fragments_is_accepted(server):
    data = event(SMILE)
    p = data.index(GRINNING)
    with echo_bus(server) as bus:
        bus.ws.send(frame(OP_TEXT, data[:p + 1], fin=False) + frame(OP_CONT, data[p + 1:p + 3], fin=False)
                    + frame(OP_CONT, data[p + 3:]))
        assert_echo(bus.recv(), SMILE, bus.id)


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
    skipped = []
    with RawWS(server.port) as ws:
        ws.send_frame(OP_CLOSE, close_payload(code, "bye \u00e9".encode()))
        got, _ = ws.expect_close(skipped=skipped)
        assert got == code
        ws.wait_eof(5 * SLOW)
    check_skipped(skipped)
    assert protocol_errors(server) == before


def test_close_with_one_byte_payload_closes_with_1002(server):
    expect_violation(server, frame(OP_CLOSE, b"\x03"), 1002)


def test_close_reason_invalid_utf8_closes_with_1007(server):
    expect_violation(server, frame(OP_CLOSE, close_payload(1000, b"bad \xff")), 1007)


def test_empty_close_gets_a_close_back(server):
    with echo_bus(server) as bus:
        ws = bus.ws
        ws.send_frame(OP_CLOSE)
        while True:
            fin, op, payload = ws.recv_frame()
            if op == OP_CLOSE:
                break
            assert op == OP_PING, "unexpected frame %r before the close: %.200r" % (op, payload)
        assert parse_close(payload)[0] in (None, 1000), payload
        ws.wait_eof(5 * SLOW)


def test_close_between_fragments_is_answered(server):
    """A close inside a fragmented message ends it: the unfinished message is
    never delivered, although its first fragment is a whole envelope that would
    come back."""
    with echo_bus(server) as bus:
        ws = bus.ws
        start = server.metrics()
        ws.send(frame(OP_TEXT, event("never"), fin=False) + frame(OP_CLOSE, close_payload(1000)))
        frames = []
        while True:
            fin, op, payload = ws.recv_frame()
            frames.append((op, payload))
            if op == OP_CLOSE:
                break
        assert parse_close(payload)[0] == 1000
        assert [f for f in frames[:-1] if f[0] != OP_PING] == [], "sent before the close: %r" % frames
        ws.wait_eof(5 * SLOW)
    assert type_deltas(start, server.metrics(), RECEIVED) == {}


# ---- ping, pong, fragments ---------------------------------------------------

@pytest.mark.parametrize("payload", [b"hello", b"", b"\x00\xff" * 62 + b"!"])
def test_ping_gets_pong_with_same_payload(server, payload):
    with echo_bus(server) as bus:
        bus.ws.send_frame(OP_PING, payload)
        fin, op, got = bus.ws.recv_frame()
        assert (fin, op, got) == (True, OP_PONG, payload)


def test_unsolicited_pong_is_ignored(server):
    with echo_bus(server) as bus:
        bus.ws.send(frame(OP_PONG, "unasked") + frame(OP_TEXT, event("still fine")))
        fin, op, payload = bus.ws.recv_frame()
        assert (fin, op) == (True, OP_TEXT), (fin, op, payload)
        assert_echo(payload, "still fine", bus.id)


# Cut inside the two bytes of the o-umlaut and inside the four of the emoji.
WORLD = "Hello, w\u00f6rld \U0001F600!"
WORLD_JSON = event(WORLD)
CUT1 = WORLD_JSON.index("\u00f6".encode()) + 1
CUT2 = WORLD_JSON.index(GRINNING) + 2
INTERLEAVED = [frame(OP_TEXT, WORLD_JSON[:CUT1], fin=False), frame(OP_PING, "p1"),
               frame(OP_CONT, WORLD_JSON[CUT1:CUT2], fin=False), frame(OP_PONG, "unasked"), frame(OP_PING, "p2"),
               frame(OP_CONT, WORLD_JSON[CUT2:])]


@pytest.mark.parametrize("how", ["one-write", "frame-per-write"])
def test_pings_between_fragments(server, how):
    with echo_bus(server) as bus:
        ws = bus.ws
        if how == "one-write":
            ws.send(b"".join(INTERLEAVED))
        else:
            set_nodelay(ws.sock)
            for f in INTERLEAVED:
                ws.send(f)
                time.sleep(0.02)
        assert ws.recv_frame() == (True, OP_PONG, b"p1")
        assert ws.recv_frame() == (True, OP_PONG, b"p2")
        fin, op, payload = ws.recv_frame()
        assert (fin, op) == (True, OP_TEXT), (fin, op, payload)
        assert_echo(payload, WORLD, bus.id)
        # Exactly once.
        ws.send_frame(OP_TEXT, event("marker"))
        fin, op, payload = ws.recv_frame()
        assert (fin, op) == (True, OP_TEXT), (fin, op, payload)
        assert_echo(payload, "marker", bus.id)


def test_envelope_split_at_every_byte(server):
    """An envelope cut into two fragments at every byte position (inside the
    JSON syntax, inside strings and inside multi-byte characters, and with an
    empty first or last fragment), with a ping between the fragments."""
    with echo_bus(server) as bus:
        ws = bus.ws
        for i in range(len(event("%03d " % 0 + WORLD)) + 1):
            data = "%03d %s" % (i, WORLD)
            text = event(data)
            ws.send(frame(OP_TEXT, text[:i], fin=False) + frame(OP_PING, str(i)) + frame(OP_CONT, text[i:]))
            assert ws.recv_frame() == (True, OP_PONG, str(i).encode()), "cut at %d" % i
            fin, op, payload = ws.recv_frame()
            assert (fin, op) == (True, OP_TEXT), "cut at %d: %r" % (i, (fin, op, payload))
            assert_echo(payload, data, bus.id)


def test_envelope_in_random_fragments(server):
    """Envelopes with multi-byte characters cut at random byte positions into 2
    to 8 fragments, some of them empty, with pings and unsolicited pongs
    between them."""
    rng = random.Random(6455)
    with echo_bus(server) as bus:
        ws = bus.ws
        for n in range(40):
            data = "#%d \u00e9t\u00e9 \u4e2d\u6587 \U0001F600 %s" % (n, "y" * rng.randrange(300))
            text = event(data)
            cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 7)))
            parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            out, pongs = [], []
            for k, part in enumerate(parts):
                op = OP_TEXT if k == 0 else OP_CONT
                out.append(frame(op, part, fin=k == len(parts) - 1))
                if k < len(parts) - 1:
                    control = rng.choice(["ping", "pong", "none"])
                    if control == "ping":
                        pongs.append(b"%d.%d" % (n, k))
                        out.append(frame(OP_PING, pongs[-1]))
                    elif control == "pong":
                        out.append(frame(OP_PONG, b"unasked"))
            ws.send(b"".join(out))
            for p in pongs:
                assert ws.recv_frame() == (True, OP_PONG, p), "message %d cut at %r" % (n, cuts)
            fin, op, payload = ws.recv_frame()
            assert (fin, op) == (True, OP_TEXT), "message %d cut at %r: %r" % (n, cuts, (fin, op, payload))
            assert_echo(payload, data, bus.id)


# ---- split reads ------------------------------------------------------------

LONG = "\u00e9t\u00e9 " + "x" * 130
SPLIT_SMILE = event(SMILE)
SPLIT_CUT = SPLIT_SMILE.index(GRINNING) + 2


@pytest.mark.parametrize("data,expected", [
    pytest.param(frame(OP_TEXT, event("hello")), [("echo", "hello")], id="short-text"),
    pytest.param(frame(OP_TEXT, event(LONG)), [("echo", LONG)], id="16-bit-length"),
    pytest.param(frame(OP_TEXT, SPLIT_SMILE[:SPLIT_CUT], fin=False) + frame(OP_PING, "p")
                 + frame(OP_CONT, SPLIT_SMILE[SPLIT_CUT:]),
                 [(OP_PONG, b"p"), ("echo", SMILE)], id="fragments-and-ping"),
    pytest.param(frame(OP_BINARY, b"") + frame(OP_TEXT, event("after empty")),
                 [("error", "unsupported_frame"), ("echo", "after empty")], id="empty-frame"),
    pytest.param(frame(OP_PING, b"z" * 125), [(OP_PONG, b"z" * 125)], id="ping-125-bytes"),
    pytest.param(frame(OP_CLOSE, close_payload(4000, b"split")), [(OP_CLOSE, b"\x0f\xa0")], id="close"),
])
def test_frames_split_byte_by_byte(server, data, expected):
    assert len(event(LONG)) > 125  # the 16-bit-length case
    with echo_bus(server) as bus:
        ws = bus.ws
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, data)
        for kind, value in expected:
            op, payload = ws.recv_message(skip_pings=False)
            if kind == "echo":
                assert op == OP_TEXT, (op, payload)
                assert_echo(payload, value, bus.id)
            elif kind == "error":
                assert op == OP_TEXT, (op, payload)
                assert_error(payload, value)
            else:
                assert (op, payload) == (kind, value)


def test_64_bit_length_frame_with_split_header(server):
    text = sized_event(70000)
    data = frame(OP_TEXT, text)
    assert data[1] & 0x7F == 127
    with echo_bus(server) as bus:
        ws = bus.ws
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, data[:14])
        for i in range(14, len(data), 7001):
            ws.send(data[i:i + 7001])
        assert_echo(bus.recv(), json.loads(text)["payload"]["data"], bus.id)


def test_invalid_frame_split_byte_by_byte(server):
    data = frame(OP_TEXT, b"ab\xf0\x9f\x98\x80\xff")
    before = protocol_errors(server)
    skipped = []
    with RawWS(server.port) as ws:
        set_nodelay(ws.sock)
        send_bytewise(ws.sock, data)
        assert ws.expect_close(skipped=skipped)[0] == 1007
        ws.wait_eof(5 * SLOW)
    check_skipped(skipped)
    assert protocol_errors(server)[1007] == before[1007] + 1


# ---- the close deadline -------------------------------------------------------

def test_protocol_error_close_does_not_wait_for_the_client(server):
    """A client that never answers the server's close frame: the server shuts
    down its side at once and releases the connection within close_timeout
    (2 s by default) although the client keeps its socket open."""
    limit = 2 + 1.5 * SLOW
    skipped = []
    with RawWS(server.port) as ws:
        server.wait_metric("arqonbus_connections", lambda v: v == 1)
        start = time.monotonic()
        ws.send_frame(OP_TEXT, "unmasked", mask=False)
        assert ws.expect_close(skipped=skipped)[0] == 1002
        ws.wait_eof(limit)
        assert time.monotonic() - start < limit
        while server.metrics()["arqonbus_connections"] != 0:
            assert time.monotonic() - start < limit, "the server still holds the connection"
            time.sleep(0.05)
    check_skipped(skipped)
    closed = server.metrics()['arqonbus_connections_closed_total{reason="protocol_error"}']
    assert closed == 1
