"""Heartbeat, graceful shutdown and the server's side of the close handshake.

What a client observes: the server pings every heartbeat_interval and closes
a client whose pong is overdue with 1011; on SIGTERM every client gets 1001
and the process exits 0, even when a client never answers; and a close frame
the server sends is readable by the client even when the client kept sending
(the lingering close of docs/protocol.md, "Closing").

Every bus connection gets a welcome envelope first; the tests read it and
check every envelope they receive against the published schema. Where a
message must come back they use an echo connection (busprobe.echo_bus) or the
ping command.
"""
import asyncio
import json
import signal
import socket
import threading
import time

import pytest
import websockets

from busprobe import assert_pong, echo_bus, echo_roundtrip, expect_only_close, ping_roundtrip
from conftest import SLOW
from envelopes import Bus, check
from rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, close_payload, frame, parse_close

HEARTBEAT = ["--heartbeat-interval", "1s", "--heartbeat-timeout", "1s"]


def read_frame_until(ws, deadline):
    """The next frame, or None when 'deadline' (monotonic) passes first."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    ws.sock.settimeout(left)
    try:
        return ws.recv_frame()
    except socket.timeout:
        return None


# ---- heartbeat ----------------------------------------------------------------

def test_client_that_answers_pings_stays_connected(make_server):
    server = make_server(args=HEARTBEAT)
    pings = []
    with echo_bus(server.port, timeout=5 * SLOW) as bus:
        assert bus.welcome["payload"]["heartbeat_interval_ms"] == 1000, bus.welcome
        ws = bus.ws
        end = time.monotonic() + 4
        while True:
            got = read_frame_until(ws, end)
            if got is None:
                break
            fin, op, payload = got
            assert op == OP_PING, "unexpected frame %r %r" % (op, payload)
            assert fin and len(payload) == 8, "the ping carries 8 bytes of server time"
            pings.append(payload)
            ws.send_frame(OP_PONG, payload)
        assert len(pings) >= 2, "only %d pings in 4 s with a 1 s interval" % len(pings)
        # Still open and still served: an event comes back, a command is answered.
        echo_roundtrip(bus, "still here")
        ping_roundtrip(bus, "arq_still_here")
    m = server.metrics()
    assert m['arqonbus_connections_closed_total{reason="heartbeat_timeout"}'] == 0


@pytest.mark.parametrize("chatty", [False, True], ids=["silent", "sends-data-but-no-pong"])
def test_client_that_never_answers_is_closed_with_1011(make_server, chatty):
    """Other traffic is no substitute for the pong."""
    server = make_server(args=HEARTBEAT)
    key = 'arqonbus_connections_closed_total{reason="heartbeat_timeout"}'
    before = server.metrics()[key]
    limit = 1 + 1 + 1.5 * SLOW
    with Bus(server.port, timeout=5 * SLOW) as bus:
        ws = bus.ws
        start = time.monotonic()
        deadline = start + limit
        pinged = False
        payload = None
        sent, replies = [], []
        last_send = 0
        while payload is None:
            assert time.monotonic() < deadline, "no close within %.1f s" % limit
            if chatty and time.monotonic() - last_send >= 0.05:
                # A valid envelope the server answers: traffic both ways.
                sent.append("arq_busy%d" % len(sent))
                bus.send({"type": "command", "command": "ping", "id": sent[-1]})
                last_send = time.monotonic()
            got = read_frame_until(ws, min(deadline, time.monotonic() + 0.05))
            if got is None:
                continue
            fin, op, data = got
            if op == OP_PING:
                pinged = True
            elif op == OP_CLOSE:
                payload = data
            else:
                assert chatty and op == OP_TEXT, "unexpected frame %r %r" % (op, data[:200])
                replies.append(check(data))
        elapsed = time.monotonic() - start
        assert pinged, "closed without a ping first"
        if chatty:
            # The commands were served until the close, in order.
            assert len(replies) >= 10, "only %d replies to %d commands" % (len(replies), len(sent))
            for env, cid in zip(replies, sent):
                assert_pong(env, cid)
        code, reason = parse_close(payload)
        assert (code, reason) == (1011, b"heartbeat timeout")
        assert 1.5 < elapsed < limit, "closed after %.2f s" % elapsed
        ws.wait_eof(limit)
    server.wait_metric(key, lambda v: v == before + 1)


# ---- graceful shutdown ----------------------------------------------------------

class WebsocketsClient(threading.Thread):
    """A Python websockets client in a thread of its own: it connects, then
    waits until the server closes the connection and records the close code."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url = url
        self.connected = threading.Event()
        self.close_code = None
        self.close_reason = None
        self.messages = []
        self.error = None

    def run(self):
        async def main():
            async with websockets.connect(self.url, open_timeout=5 * SLOW) as ws:
                self.connected.set()
                try:
                    async for msg in ws:
                        self.messages.append(msg)
                finally:
                    self.close_code, self.close_reason = ws.close_code, ws.close_reason
        try:
            asyncio.run(main())
        except Exception as e:  # reported by the test
            self.error = e
            self.connected.set()


def test_sigterm_closes_every_client_with_1001(make_server):
    # Long deadlines: the process must exit because every client closed, not
    # because a deadline passed.
    server = make_server(args=["--close-timeout", "10s", "--drain-timeout", "10s"])
    wsc = WebsocketsClient(server.url)
    wsc.start()
    raws = [Bus(server.port, timeout=5 * SLOW), Bus(server.port, timeout=5 * SLOW)]
    try:
        assert wsc.connected.wait(5 * SLOW) and wsc.error is None, wsc.error
        server.wait_metric("arqonbus_connections", lambda v: v == 3)
        server.proc.send_signal(signal.SIGTERM)
        for bus in raws:
            ws = bus.ws
            code, reason = expect_only_close(ws, timeout=5 * SLOW)
            assert (code, reason) == (1001, "server shutting down")
            ws.send_frame(OP_CLOSE, close_payload(1001))
            ws.wait_eof(5 * SLOW)
            ws.close()
        wsc.join(5 * SLOW)
        assert not wsc.is_alive()
        assert wsc.error is None, wsc.error
        assert (wsc.close_code, wsc.close_reason) == (1001, "server shutting down")
        # It got its welcome, and nothing else, before the close.
        assert len(wsc.messages) == 1, wsc.messages
        welcome = check(wsc.messages[0])
        assert welcome["type"] == "system" and welcome["payload"]["event"] == "welcome", welcome
        # Everyone answered and closed: the server exits without waiting for
        # a deadline.
        server.proc.wait(5 * SLOW)
    finally:
        for ws in raws:
            ws.close()
    assert server.stop() == 0


def test_sigterm_with_a_client_that_never_answers(make_server):
    server = make_server(args=["--close-timeout", "1s", "--drain-timeout", "3s"])
    with Bus(server.port, timeout=5 * SLOW) as bus:
        server.wait_metric("arqonbus_connections", lambda v: v == 1)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert expect_only_close(bus.ws, timeout=5 * SLOW) == (1001, "server shutting down")
        # No answer, and the socket stays open until the process is gone.
        server.proc.wait(3 + 3 * SLOW)
        elapsed = time.monotonic() - start
    assert elapsed < 3 + 3 * SLOW
    assert server.stop() == 0


def test_sigterm_drain_timeout_bounds_the_wait(make_server):
    """With a close_timeout longer than drain_timeout, the drain deadline ends it."""
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "1s"])
    with Bus(server.port, timeout=5 * SLOW) as bus:
        server.wait_metric("arqonbus_connections", lambda v: v == 1)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert expect_only_close(bus.ws, timeout=5 * SLOW) == (1001, "server shutting down")
        server.proc.wait(1 + 3 * SLOW)
        elapsed = time.monotonic() - start
    assert elapsed < 1 + 3 * SLOW
    assert server.stop() == 0


def test_second_signal_drops_everything_at_once(make_server):
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "30s"])
    with Bus(server.port, timeout=5 * SLOW) as bus:
        server.wait_metric("arqonbus_connections", lambda v: v == 1)
        server.proc.send_signal(signal.SIGTERM)
        assert expect_only_close(bus.ws, timeout=5 * SLOW) == (1001, "server shutting down")
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(5 * SLOW)
    assert server.stop() == 0


def test_signals_after_the_stop_do_not_change_the_exit(make_server):
    # Once the server has stopped serving ("stopped"), signals that keep
    # coming (an impatient supervisor) find nothing to do: it still exits 0.
    server = make_server()
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10 * SLOW
    while "msg=stopped" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.01)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        if server.proc.poll() is None:
            server.proc.send_signal(sig)
    assert server.proc.wait(10 * SLOW) == 0
    assert server.stop() == 0


def test_sigterm_drops_pending_handshakes(make_server):
    server = make_server()
    half = socket.create_connection(("127.0.0.1", server.port), timeout=5 * SLOW)
    try:
        half.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.1)
        server.proc.send_signal(signal.SIGTERM)
        try:
            data = half.recv(4096)
        except ConnectionResetError:
            data = b""
        assert data == b""
        server.proc.wait(5 * SLOW)
    finally:
        half.close()
    assert server.stop() == 0


# ---- lingering close ------------------------------------------------------------

def test_close_frame_survives_data_sent_after_it(server):
    """The server closes (protocol error) while the client is still sending: the
    client can still read the close frame instead of losing it to a reset."""
    with Bus(server.port, timeout=5 * SLOW) as bus:
        ws = bus.ws
        # A valid envelope in an unmasked frame: the frame alone is the error.
        ws.send_frame(OP_TEXT, '{"type":"command","command":"ping","id":"arq_unmasked"}', mask=False)
        time.sleep(0.2)  # the close frame is on its way and the server's side is shut
        junk = frame(OP_BINARY, b"j" * 60000)
        try:
            for _ in range(8):
                ws.send(junk)
                time.sleep(0.02)
        except OSError as e:
            raise AssertionError("the server reset the connection while the client was sending: %r" % e)
        code, reason = expect_only_close(ws, timeout=5 * SLOW)
        assert code == 1002
        ws.wait_eof(5 * SLOW)


def test_shutdown_close_frame_survives_data_sent_after_it(make_server):
    """Same for the 1001 of a graceful shutdown, with a client that is busy
    sending messages when the close arrives."""
    server = make_server()
    with Bus(server.port, timeout=5 * SLOW) as bus:
        ws = bus.ws
        server.wait_metric("arqonbus_connections", lambda v: v == 1)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Valid events to a channel the sender is not in: whether the server
        # still reads them or not, nothing comes back but the close.
        event = json.dumps({"type": "event", "room": "t", "channel": "busy", "payload": {"data": "m" * 60000}})
        try:
            for _ in range(8):
                ws.send(frame(OP_TEXT, event))
                time.sleep(0.02)
        except OSError as e:
            raise AssertionError("the server reset the connection while the client was sending: %r" % e)
        assert expect_only_close(ws, timeout=5 * SLOW) == (1001, "server shutting down")
        ws.wait_eof(5 * SLOW)
    server.proc.wait(5 * SLOW)
    assert server.stop() == 0


def test_close_frame_survives_data_sent_after_it_behind_a_backlog(server):
    """Same, with messages queued ahead of the close frame: they arrive first,
    then the close frame, then EOF."""
    with echo_bus(server.port, timeout=5 * SLOW) as bus:
        ws = bus.ws
        # 20 events of 20 kB each, echoed back to the sender: the backlog.
        data = ["%04d" % i * 5000 for i in range(20)]
        msgs = [frame(OP_TEXT, json.dumps({"type": "event", "id": "arq_backlog%d" % i, "payload": {"data": d}}))
                for i, d in enumerate(data)]
        ws.send(b"".join(msgs) + frame(OP_TEXT, "bad", rsv=4) + frame(OP_BINARY, b"x" * 100000))
        for i in range(20):
            env = bus.recv()
            assert (env["type"], env["id"], env["from"]) == ("event", "arq_backlog%d" % i, bus.id), env
            assert env["payload"] == {"data": data[i]}
        assert expect_only_close(ws, timeout=5 * SLOW)[0] == 1002
        ws.wait_eof(5 * SLOW)
