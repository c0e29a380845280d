"""Real client libraries against the bus: Python's websockets and Node's ws.

Hand-built frames (test_frames.py) show that the server follows RFC 6455;
these tests show that the clients people actually use get what they expect
from it, each observed through the library's own API: the welcome, their
events delivered back unchanged (they connect with `echo=true` and an
initial channel, and publish to it), binary messages received whole and
answered with an `unsupported_frame` error, the size limit, ping and pong,
and the close handshake. A raw-socket observer on the same channel checks
what other clients receive. Every envelope a client receives is checked
against the published schema (envelopes.check).

The Node client is tests/integration/node/client.js, run with `node`; it
needs tests/integration/node/node_modules (make deps, or npm ci in that
directory). When node or ws is missing the Node tests fail: they never skip.
"""
import asyncio
import base64
import json
import os
import shutil
import subprocess

import pytest
import websockets

from conftest import SLOW
from envelopes import Bus, check, error_code, query
from rawws import OP_CLOSE, close_payload, parse_close
from wsutil import read_envelopes, type_deltas

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
LIMIT = 1048576  # the default max_message_size, 1 MiB
NORMAL = 'arqonbus_connections_closed_total{reason="normal"}'
RECEIVED = "arqonbus_messages_received_total"
DELIVERED = "arqonbus_messages_delivered_total"
# Envelopes as large as messages may be, so that the 1 MiB tests are about
# the message limit (1009) and not the envelope limit (payload_too_large).
BIG_ENVELOPES = ["--max-envelope-size", "64MiB"]


def connect(url, **kw):
    kw.setdefault("open_timeout", 5 * SLOW)
    kw.setdefault("ping_interval", None)  # no client pings in between the test's own frames
    return websockets.connect(url, **kw)


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), 10 * SLOW)


async def recv_env(ws):
    """The next message, which must be a text envelope valid per the schema."""
    msg = await recv(ws)
    assert isinstance(msg, str), "the server sent a binary message: %r" % msg[:200]
    return check(msg)


async def welcome(ws):
    env = await recv_env(ws)
    assert env["type"] == "system" and env["payload"]["event"] == "welcome", env
    return env


def event(data, **fields):
    """An event for the connection's initial channel, as JSON text (UTF-8
    left as is, so it crosses the wire unescaped)."""
    return json.dumps(dict({"type": "event", "payload": {"data": data}}, **fields), ensure_ascii=False)


def sized_event(size):
    """An event of exactly 'size' bytes of JSON."""
    head, tail = '{"type":"event","payload":{"data":"', '"}}'
    text = head + "a" * (size - len(head) - len(tail)) + tail
    assert len(text.encode()) == size
    return text


def assert_event(env, data, sender, room="t", channel="echo"):
    assert env["type"] == "event", env
    assert (env["room"], env["channel"], env["from"]) == (room, channel, sender), env
    assert env["payload"] == {"data": data}, "the payload changed on the way"


def assert_unsupported_frame(env):
    assert error_code(env) == "unsupported_frame", env
    assert "correlation_id" not in env and "command" not in env, env


# ---- Python websockets ----------------------------------------------------------

def test_websockets_echo_text_and_binary(server):
    # Text goes out as events and comes back; binary gets an error each.
    messages = ["hello", "", "h\u00e9llo \U0001F600 \u4e16\u754c", b"\x00\x01\xfe\xff" * 64, b"",
                bytes(range(256)) * 300, "t" * 70000]
    before = server.metrics()

    def expect(env, m, me, i=None):
        if isinstance(m, bytes):
            assert_unsupported_frame(env)
        else:
            assert_event(env, m, me)
            if i is not None:
                assert env["id"] == "arq_m%d" % i, env

    async def run():
        async with connect(server.url + query(echo=True, channel="t:echo")) as ws:
            w = await welcome(ws)
            me = w["payload"]["client_id"]
            assert w["payload"]["echo"] is True and w["payload"]["subscriptions"] == ["t:echo"], w
            ids = set()
            for m in messages:
                await ws.send(event(m) if isinstance(m, str) else m)
                env = await recv_env(ws)
                expect(env, m, me)
                ids.add(env["id"])
            assert len(ids) == len(messages), "the server gave two messages the same id"
            # Several in flight at once come back in order.
            for i, m in enumerate(messages):
                await ws.send(event(m, id="arq_m%d" % i) if isinstance(m, str) else m)
            for i, m in enumerate(messages):
                expect(await recv_env(ws), m, me, i)
    asyncio.run(run())
    # Each message was received once, whole: one error per binary message
    # (counted as invalid), and the text right behind each one was still
    # understood as an event.
    after = server.metrics()
    texts = sum(1 for m in messages if isinstance(m, str))
    binaries = len(messages) - texts
    assert type_deltas(before, after, RECEIVED) == {"event": 2 * texts, "invalid": 2 * binaries}
    # Back came the welcome, each event, and an error per binary message.
    assert type_deltas(before, after, DELIVERED) == {"system": 1, "event": 2 * texts, "error": 2 * binaries}


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_websockets_message_of_exactly_1_mib_is_echoed(make_server, kind):
    server = make_server(args=BIG_ENVELOPES)
    payload = sized_event(LIMIT) if kind == "text" else os.urandom(LIMIT)

    async def run():
        async with connect(server.url + query(echo=True, channel="t:echo"), max_size=2 * LIMIT) as ws:
            me = (await welcome(ws))["payload"]["client_id"]
            await ws.send(payload)
            env = await recv_env(ws)
            if kind == "text":
                assert_event(env, json.loads(payload)["payload"]["data"], me)
            else:
                assert_unsupported_frame(env)
            # The connection is still open and in step.
            await ws.send(event("after"))
            assert_event(await recv_env(ws), "after", me)
    asyncio.run(run())


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_websockets_message_over_1_mib_is_closed_with_1009(make_server, kind):
    server = make_server(args=BIG_ENVELOPES)
    key = 'arqonbus_protocol_errors_total{code="1009"}'
    before = server.metrics()[key]
    payload = sized_event(LIMIT + 1) if kind == "text" else os.urandom(LIMIT + 1)

    async def run():
        async with connect(server.url + query(echo=True, channel="t:echo"), max_size=2 * LIMIT) as ws:
            await welcome(ws)
            await ws.send(payload)
            with pytest.raises(websockets.ConnectionClosedError):
                await recv(ws)  # nothing else arrives before the close
            return ws.close_code, ws.close_reason
    assert asyncio.run(run()) == (1009, "message over the size limit")
    assert server.metrics()[key] == before + 1


def test_websockets_ping_gets_its_pong(server):
    async def run():
        async with connect(server.url + query(echo=True, channel="t:echo")) as ws:
            me = (await welcome(ws))["payload"]["client_id"]
            for data in (b"", b"arqonbus", os.urandom(125)):
                waiter = await ws.ping(data)  # resolves when the pong with this payload arrives
                await asyncio.wait_for(waiter, 5 * SLOW)
            # Pings interleaved with data: both answered, the event delivered.
            waiter = await ws.ping(b"between")
            await ws.send(event("after the ping"))
            await asyncio.wait_for(waiter, 5 * SLOW)
            assert_event(await recv_env(ws), "after the ping", me)
    asyncio.run(run())


def test_websockets_clean_close_1000_seen_by_both_sides(server):
    before = server.metrics()
    url = server.url + query(echo=True, channel="t:close")

    async def run():
        async with connect(url) as other:
            other_id = (await welcome(other))["payload"]["client_id"]
            ws = await connect(url)
            ws_id = (await welcome(ws))["payload"]["client_id"]
            joined = await recv_env(other)
            assert (joined["type"], joined["payload"]["event"], joined["payload"]["client_id"],
                    joined["payload"]["members"]) == ("system", "client_joined", ws_id, 2), joined
            await ws.send(event("last words"))
            assert_event(await recv_env(ws), "last words", ws_id, "t", "close")
            assert_event(await recv_env(other), "last words", ws_id, "t", "close")
            await asyncio.wait_for(ws.close(1000, "bye"), 5 * SLOW)
            # The client saw the server's close frame, which echoes its code.
            assert ws.close_code == 1000
            assert ws.close_reason == ""
            # The server saw a normal close; the other client is told and unaffected.
            server.wait_metric(NORMAL, lambda v: v == before[NORMAL] + 1)
            server.wait_metric("arqonbus_connections", lambda v: v == 1)
            left = await recv_env(other)
            assert (left["type"], left["room"], left["channel"]) == ("system", "t", "close"), left
            assert {k: left["payload"].get(k) for k in ("event", "client_id", "members", "reason")} == \
                {"event": "client_left", "client_id": ws_id, "members": 1, "reason": "disconnected"}, left
            await other.send(event("still here"))
            assert_event(await recv_env(other), "still here", other_id, "t", "close")
    asyncio.run(run())
    after = server.wait_metric(NORMAL, lambda v: v == before[NORMAL] + 2)
    assert after == before[NORMAL] + 2
    assert server.metrics()["arqonbus_connections"] == 0
    disconnects = [line for line in server.log().splitlines() if 'msg="client disconnected"' in line]
    assert len(disconnects) == 2 and all(line.endswith("reason=normal") for line in disconnects), disconnects


# ---- Node ws --------------------------------------------------------------------

def run_node(script, timeout):
    """Runs node/client.js with 'script'; returns its JSON report."""
    node = shutil.which("node")
    assert node, "node is not installed (make deps installs it); the Node client tests cannot run"
    ws_pkg = os.path.join(NODE_DIR, "node_modules", "ws", "package.json")
    assert os.path.isfile(ws_pkg), ("Node's ws is not installed: run `cd tests/integration/node && npm ci` "
                                    "(or make deps)")
    script = dict(script, timeout_ms=int(timeout * 1000))
    proc = subprocess.run([node, "client.js"], cwd=NODE_DIR, input=json.dumps(script).encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout + 10)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, "client.js exited %d\nstdout: %s\nstderr: %s" % (proc.returncode, out, err)
    report = json.loads(out)
    assert report["error"] is None, report
    assert not report["timed_out"], report
    return report


def node_envelopes(report):
    """The messages the Node client received: all text, each checked against
    the schema. Returns [(envelope, text bytes)]."""
    out = []
    for m in report["messages"]:
        assert not m["binary"], "the server sent a binary message: %r" % m
        data = base64.b64decode(m["data"])
        assert m["text"] == data.decode("utf-8"), m
        out.append((check(data), data))
    return out


def b64(data):
    return base64.b64encode(data).decode()


def test_node_ws_text_fragments_binary_ping_and_close(server):
    hello = json.dumps({"type": "event", "id": "arq_node_1", "payload": {"data": "hello from node"}}).encode()
    smile = '{"type":"event","id":"arq_node_2","payload":{"data":"smile \U0001F600 ok"}}'.encode()
    cut = smile.index(b"\xf0")  # the emoji is f0 9f 98 80
    parts = [smile[:cut + 1], smile[cut + 1:cut + 3], smile[cut + 3:]]  # cut twice inside the code point
    blob = bytes(range(256)) * 40
    before = server.metrics()
    with Bus(server.port, timeout=10 * SLOW, channel="t:node") as observer:
        report = run_node({
            "url": server.url + query(echo=True, channel="t:node"),
            "steps": [
                {"op": "text", "data": hello.decode()},
                {"op": "fragments", "parts": [b64(p) for p in parts], "binary": False},
                {"op": "binary", "data": b64(blob)},
                {"op": "ping", "data": b64(b"node-ping")},
            ],
            "expect_messages": 4,  # the welcome, its two events back, the error
            "close": {"code": 1000, "reason": "node done"},
        }, timeout=10 * SLOW)
        # Another member of the channel got each event whole (the fragmented
        # one as one frame), between the Node client's join and leave.
        [seen] = read_envelopes([observer.ws], [4], 5 * SLOW, raw=True)
        observer.ws.send_frame(OP_CLOSE, close_payload(1000))
        fin, op, payload = observer.ws.recv_frame()  # nothing else was queued to it
        assert (op, parse_close(payload)) == (OP_CLOSE, (1000, b""))
        observer.ws.wait_eof(5 * SLOW)
    # The Node client got the welcome, then its own events back, in order,
    # and an error for the binary message.
    assert report["opened"]
    got = node_envelopes(report)
    assert len(got) == 4, got
    w = got[0][0]
    assert w["type"] == "system" and w["payload"]["event"] == "welcome", w
    assert w["payload"]["subscriptions"] == ["t:node"] and w["payload"]["echo"] is True, w
    node_id = w["payload"]["client_id"]
    assert_event(got[1][0], "hello from node", node_id, "t", "node")
    assert got[1][0]["id"] == "arq_node_1"
    assert_event(got[2][0], "smile \U0001F600 ok", node_id, "t", "node")
    assert got[2][0]["id"] == "arq_node_2"
    assert_unsupported_frame(got[3][0])
    assert report["pongs"] == [b64(b"node-ping")]
    assert report["close"] == {"code": 1000, "reason": ""}
    # The observer: the join, the same two events byte for byte, the leave.
    joined, left = seen[0][0], seen[3][0]
    assert (joined["type"], joined["payload"]["event"], joined["payload"]["client_id"]) == \
        ("system", "client_joined", node_id), joined
    assert [data for _, data in seen[1:3]] == [got[1][1], got[2][1]]
    assert (left["type"], left["payload"]["event"], left["payload"]["client_id"], left["payload"]["reason"]) == \
        ("system", "client_left", node_id, "disconnected"), left
    server.wait_metric(NORMAL, lambda v: v == before[NORMAL] + 2)  # node, then the observer
    after = server.metrics()
    # Two events and one binary message (invalid) came in.
    assert type_deltas(before, after, RECEIVED) == {"event": 2, "invalid": 1}
    # Out went what the two clients read, plus the observer's welcome: the
    # welcomes and the observer's join and leave notes are system envelopes.
    delivered = type_deltas(before, after, DELIVERED)
    assert delivered == {"system": 1 + 1 + 2, "event": 2 + 2, "error": 1}, delivered
    assert sum(delivered.values()) == len(got) + 1 + len(seen)
    assert after["arqonbus_connections"] == 0


def test_node_ws_sees_1009_for_fragments_over_the_limit(make_server):
    server = make_server(args=["--max-message-size", "1KiB"])
    report = run_node({
        "url": server.url + query(echo=True, channel="t:node"),
        "steps": [
            {"op": "text", "data": event("fits")},
            {"op": "fragments", "parts": [b64(b"a" * 600), b64(b"b" * 600)], "binary": True},
        ],
        "expect_messages": 2,
        "close": None,  # wait for the server to close
    }, timeout=10 * SLOW)
    got = [env for env, _ in node_envelopes(report)]
    assert len(got) == 2, got
    assert got[0]["type"] == "system" and got[0]["payload"]["event"] == "welcome", got[0]
    assert_event(got[1], "fits", got[0]["payload"]["client_id"], "t", "node")
    assert report["close"] == {"code": 1009, "reason": "message over the size limit"}
