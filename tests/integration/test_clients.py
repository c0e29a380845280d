"""Real client libraries against the bus: Python's websockets and Node's ws.

Hand-built frames (test_frames.py) show that the server follows RFC 6455;
these tests show that the clients people actually use get what they expect
from it: their messages echoed back unchanged (the interim routing sends
every message to every bus client, the sender included), the size limit,
ping and pong, and the close handshake, each observed through the
library's own API. A raw-socket observer on the bus checks what other
clients receive.

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
from rawws import OP_BINARY, OP_CLOSE, OP_TEXT, RawWS, close_payload
from wsutil import read_messages

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
LIMIT = 1048576  # the default max_message_size, 1 MiB
NORMAL = 'arqonbus_connections_closed_total{reason="normal"}'


def connect(url, **kw):
    kw.setdefault("open_timeout", 5 * SLOW)
    kw.setdefault("ping_interval", None)  # no client pings in between the test's own frames
    return websockets.connect(url, **kw)


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), 10 * SLOW)


# ---- Python websockets ----------------------------------------------------------

def test_websockets_echo_text_and_binary(server):
    messages = ["hello", "", "h\u00e9llo \U0001F600 \u4e16\u754c", b"\x00\x01\xfe\xff" * 64, b"",
                bytes(range(256)) * 300, "t" * 70000]

    async def run():
        async with connect(server.url) as ws:
            for m in messages:
                await ws.send(m)
                got = await recv(ws)
                assert type(got) is type(m), "sent %s, got %s back" % (type(m).__name__, type(got).__name__)
                assert got == m
            # Several in flight at once come back in order.
            for m in messages:
                await ws.send(m)
            assert [await recv(ws) for _ in messages] == messages
    asyncio.run(run())


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_websockets_message_of_exactly_1_mib_is_echoed(server, kind):
    payload = "a" * LIMIT if kind == "text" else os.urandom(LIMIT)

    async def run():
        async with connect(server.url, max_size=2 * LIMIT) as ws:
            await ws.send(payload)
            got = await recv(ws)
            assert got == payload
    asyncio.run(run())


def test_websockets_message_over_1_mib_is_closed_with_1009(server):
    key = 'arqonbus_protocol_errors_total{code="1009"}'
    before = server.metrics()[key]

    async def run():
        async with connect(server.url, max_size=2 * LIMIT) as ws:
            await ws.send(os.urandom(LIMIT + 1))
            with pytest.raises(websockets.ConnectionClosedError):
                await recv(ws)
            return ws.close_code, ws.close_reason
    assert asyncio.run(run()) == (1009, "message over the size limit")
    assert server.metrics()[key] == before + 1


def test_websockets_ping_gets_its_pong(server):
    async def run():
        async with connect(server.url) as ws:
            for data in (b"", b"arqonbus", os.urandom(125)):
                waiter = await ws.ping(data)  # resolves when the pong with this payload arrives
                await asyncio.wait_for(waiter, 5 * SLOW)
            # Pings interleaved with data: both answered, the data echoed.
            waiter = await ws.ping(b"between")
            await ws.send("after the ping")
            await asyncio.wait_for(waiter, 5 * SLOW)
            assert await recv(ws) == "after the ping"
    asyncio.run(run())


def test_websockets_clean_close_1000_seen_by_both_sides(server):
    before = server.metrics()

    async def run():
        async with connect(server.url) as other:
            ws = await connect(server.url)
            await ws.send("last words")
            assert await recv(ws) == "last words"
            assert await recv(other) == "last words"
            await asyncio.wait_for(ws.close(1000, "bye"), 5 * SLOW)
            # The client saw the server's close frame, which echoes its code.
            assert ws.close_code == 1000
            assert ws.close_reason == ""
            # The server saw a normal close; the other client is unaffected.
            server.wait_metric(NORMAL, lambda v: v == before[NORMAL] + 1)
            server.wait_metric("arqonbus_connections", lambda v: v == 1)
            await other.send("still here")
            assert await recv(other) == "still here"
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


def b64(data):
    return base64.b64encode(data).decode()


def test_node_ws_text_fragments_binary_ping_and_close(server):
    smile = "smile \U0001F600 ok".encode()  # the emoji is f0 9f 98 80, bytes 6-9
    parts = [smile[:7], smile[7:9], smile[9:]]  # cut twice inside the code point
    blob = bytes(range(256)) * 40
    before = server.metrics()
    with RawWS(server.port, timeout=10 * SLOW) as observer:
        report = run_node({
            "url": server.url,
            "steps": [
                {"op": "text", "data": "hello from node"},
                {"op": "fragments", "parts": [b64(p) for p in parts], "binary": False},
                {"op": "binary", "data": b64(blob)},
                {"op": "ping", "data": b64(b"node-ping")},
            ],
            "expect_messages": 3,
            "close": {"code": 1000, "reason": "node done"},
        }, timeout=10 * SLOW)
        # Another bus client got each message whole, the fragmented one as one frame.
        [seen] = read_messages([observer], [3], 5 * SLOW)
        observer.send_frame(OP_CLOSE, close_payload(1000))
        assert observer.expect_close(5 * SLOW) == (1000, "")
        observer.wait_eof(5 * SLOW)
    assert seen == [(OP_TEXT, b"hello from node"), (OP_TEXT, smile), (OP_BINARY, blob)]
    # The Node client got its own messages back, in order and with their types.
    assert report["opened"]
    got = [(m["binary"], base64.b64decode(m["data"])) for m in report["messages"]]
    assert got == [(False, b"hello from node"), (False, smile), (True, blob)]
    assert report["pongs"] == [b64(b"node-ping")]
    assert report["close"] == {"code": 1000, "reason": ""}
    server.wait_metric(NORMAL, lambda v: v == before[NORMAL] + 2)  # node, then the observer
    after = server.metrics()
    assert after["arqonbus_messages_received_total"] == before["arqonbus_messages_received_total"] + 3
    assert after["arqonbus_connections"] == 0


def test_node_ws_sees_1009_for_fragments_over_the_limit(make_server):
    server = make_server(args=["--max-message-size", "1KiB"])
    report = run_node({
        "url": server.url,
        "steps": [
            {"op": "text", "data": "fits"},
            {"op": "fragments", "parts": [b64(b"a" * 600), b64(b"b" * 600)], "binary": True},
        ],
        "expect_messages": 1,
        "close": None,  # wait for the server to close
    }, timeout=10 * SLOW)
    assert [base64.b64decode(m["data"]) for m in report["messages"]] == [b"fits"]
    assert report["close"] == {"code": 1009, "reason": "message over the size limit"}
