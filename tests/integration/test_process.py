"""The arqonbus process: startup banner, signals, churn and abrupt peers.

What an operator observes: the banner on stdout names the three addresses
(logs go to stderr); SIGINT and SIGTERM close every client with 1001 and the
process exits 0 within drain_timeout; thousands of connections opened and
closed leave the server at zero connections and healthy; clients that vanish
mid-frame, with a FIN or a reset, are counted as closed and cost nothing
else; and the telemetry port takes WebSocket clients of its own.
"""
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import websockets

import conftest
from conftest import SLOW, Server
from rawws import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWS, close_payload, frame, upgrade_request)
from wsutil import closed_by_reason, closed_total, connect_many, http_request, read_messages, reset

SHUTDOWN = (1001, "server shutting down")


def health(server):
    status, _, body = http_request(server.http_port, b"GET /health HTTP/1.1\r\n\r\n", 5 * SLOW)
    assert status == 200, body
    return json.loads(body)


def echo_works(server):
    with RawWS(server.port, timeout=5 * SLOW) as ws:
        ws.send_frame(OP_TEXT, "still serving")
        assert ws.recv_message() == (OP_TEXT, b"still serving")


# ---- the banner -------------------------------------------------------------------

class SplitServer(Server):
    """A Server whose stdout goes to a file of its own (stderr to the log)."""

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
        env.update(self.env)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        self.stdout_path = os.path.join(self.tmpdir, "stdout-%d.txt" % self.port)
        self.logfile = open(self.log_path, "wb")
        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=self.logfile, cwd=self.tmpdir, env=env)
        for port in (self.port, self.telemetry_port, self.http_port):
            if not conftest.wait_port(port, 10 * SLOW):
                self.stop(check=False)
                raise RuntimeError("arqonbus did not start listening:\n" + self.log())
        return self

    def stdout(self):
        with open(self.stdout_path, "rb") as f:
            return f.read().decode()


@pytest.mark.parametrize("log_format", ["logfmt", "json"])
def test_banner_on_stdout_says_where_it_listens(log_format):
    server = SplitServer(tempfile.mkdtemp(prefix="arqonbus-test-"), args=["--log-format", log_format])
    server.start()
    ok = False
    try:
        # Printed before the loop starts, and flushed although stdout is a file.
        out = server.stdout()
        assert re.search(r"^ArqonBus \d+\.\d+\.\d+ is running", out, re.M), out
        assert re.search(r"^\s*WebSocket bus\s+ws://127\.0\.0\.1:%d$" % server.port, out, re.M), out
        assert re.search(r"^\s*Telemetry\s+ws://127\.0\.0\.1:%d$" % server.telemetry_port, out, re.M), out
        assert re.search(r"^\s*HTTP ops\s+http://127\.0\.0\.1:%d/health\b" % server.http_port, out, re.M), out
        assert "level" not in out, "log lines on stdout: %r" % out
        # The log on stderr says the same in its own format, and no banner.
        err = server.log()
        assert "ArqonBus" not in err
        first = err.splitlines()[0]
        if log_format == "json":
            line = json.loads(first)
            assert (line["msg"], line["port"], line["telemetry_port"], line["http_port"]) == (
                "listening", server.port, server.telemetry_port, server.http_port)
        else:
            assert "msg=listening" in first
            assert "port=%d telemetry_port=%d http_port=%d" % (server.port, server.telemetry_port,
                                                                server.http_port) in first
        ok = True
    finally:
        try:
            server.stop(check=ok)
        finally:
            if not ok:
                print("----- stdout -----\n%s\n----- stderr -----\n%s" % (server.stdout(), server.log()))


# ---- signals ---------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_closes_every_client_with_1001_and_exits_0(make_server, sig):
    drain = 3
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "%ds" % drain])
    raws = connect_many(server.port, 3) + connect_many(server.telemetry_port, 1)

    async def run():
        libs = [await websockets.connect(server.url, open_timeout=5 * SLOW, ping_interval=None) for _ in range(2)]
        assert health(server)["connections"] == 6
        start = time.monotonic()
        server.proc.send_signal(sig)
        for ws in raws:
            assert ws.expect_close(5 * SLOW) == SHUTDOWN
            ws.send_frame(OP_CLOSE, close_payload(1001))
            ws.wait_eof(5 * SLOW)
            ws.close()
        for ws in libs:
            await asyncio.wait_for(ws.wait_closed(), 5 * SLOW)
            assert (ws.close_code, ws.close_reason) == SHUTDOWN
        return start
    try:
        start = asyncio.run(run())
        # Every client answered: the process exits without waiting out drain_timeout.
        assert server.proc.wait(drain + 2 * SLOW) == 0
        assert time.monotonic() - start < drain + 2 * SLOW
    finally:
        for ws in raws:
            ws.close()
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    log = server.log()
    assert 'msg="shutting down" signal=%s connections=6' % name in log
    assert log.count("reason=shutdown") == 6
    assert log.rstrip().endswith("msg=stopped")
    assert server.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_exits_0_within_drain_timeout_when_clients_never_answer(make_server, sig):
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "1s"])
    silent = connect_many(server.port, 2)
    try:
        assert health(server)["connections"] == 2
        start = time.monotonic()
        server.proc.send_signal(sig)
        for ws in silent:
            assert ws.expect_close(5 * SLOW) == SHUTDOWN
        # No answer and the sockets stay open: drain_timeout ends the wait.
        assert server.proc.wait(1 + 3 * SLOW) == 0
        assert time.monotonic() - start < 1 + 3 * SLOW
        for ws in silent:
            ws.wait_eof(5 * SLOW)
    finally:
        for ws in silent:
            ws.close()
    assert "drain timeout" in server.log()
    assert server.stop() == 0


def test_new_connections_are_refused_while_draining(make_server):
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "10s"])
    with RawWS(server.port) as ws:
        server.proc.send_signal(signal.SIGTERM)
        assert ws.expect_close(5 * SLOW) == SHUTDOWN
        # The listeners are closed: no new bus client is accepted.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5 * SLOW).close()
        ws.send_frame(OP_CLOSE, close_payload(1001))
        ws.wait_eof(5 * SLOW)
    assert server.proc.wait(5 * SLOW) == 0
    assert server.stop() == 0


def test_health_answers_503_while_draining(make_server):
    # The ops port stays open during the drain so that load balancers see the
    # server going away; the bus port is already closed.
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "10s"])
    with RawWS(server.port) as ws:
        status, _, body = server.http("/health")
        assert status == 200
        server.proc.send_signal(signal.SIGTERM)
        assert ws.expect_close(5 * SLOW) == SHUTDOWN
        status, headers, body = server.http("/health")
        assert status == 503
        assert json.loads(body)["status"] == "shutting_down"
        ws.send_frame(OP_CLOSE, close_payload(1001))
        ws.wait_eof(5 * SLOW)
    assert server.proc.wait(5 * SLOW) == 0
    assert server.stop() == 0


# ---- churn ---------------------------------------------------------------------

def test_a_thousand_connect_disconnect_cycles(server):
    before = server.metrics()
    batches, size = 10, 100
    for _ in range(batches):
        conns = connect_many(server.port, size, timeout=10 * SLOW)
        try:
            # Half close cleanly, a quarter just go (FIN), a quarter reset.
            clean = conns[: size // 2]
            for ws in clean:
                ws.send_frame(OP_CLOSE, close_payload(1000))
            for ws in clean:
                assert ws.expect_close(5 * SLOW) == (1000, "")
                ws.wait_eof(5 * SLOW)
                ws.close()
            for i, ws in enumerate(conns[size // 2:]):
                if i % 2:
                    reset(ws.sock)
                else:
                    ws.close()
        finally:
            for ws in conns:
                ws.close()
    n = batches * size
    server.wait_metric("arqonbus_connections", lambda v: v == 0, timeout=10)
    m = server.metrics()
    assert m["arqonbus_connections_opened_total"] - before["arqonbus_connections_opened_total"] == n
    assert closed_total(m) - closed_total(before) == n
    reasons = {k: v - closed_by_reason(before)[k] for k, v in closed_by_reason(m).items()}
    assert reasons["normal"] == n // 2
    assert reasons["peer_gone"] + reasons["io_error"] == n // 2
    h = health(server)
    assert (h["status"], h["connections"]) == ("ok", 0)
    echo_works(server)


# ---- abrupt disconnects -----------------------------------------------------------

def test_abrupt_disconnects_are_counted_and_harmless(server):
    before = server.metrics()
    partial = frame(OP_BINARY, b"p" * 1000)[:300]  # header and part of the payload
    victims = connect_many(server.port, 40)
    sender = RawWS(server.port, timeout=10 * SLOW)
    try:
        # Mid-frame, then a reset (10) or a FIN (10).
        for ws in victims[:20]:
            ws.send(partial)
        time.sleep(0.1)
        for i, ws in enumerate(victims[:20]):
            if i % 2:
                ws.close()
            else:
                reset(ws.sock)
        # A reset while messages are on their way to the client (20): they
        # never read what the sender publishes.
        blob = b"b" * 60000
        for i in range(10):
            sender.send_frame(OP_BINARY, blob)
            if i == 4:
                for ws in victims[20:]:
                    reset(ws.sock)
        # A reset in the middle of a handshake: never a WebSocket, not counted.
        half = socket.create_connection(("127.0.0.1", server.port), timeout=5 * SLOW)
        half.sendall(upgrade_request()[0][:40])
        time.sleep(0.05)
        reset(half)
        # The sender is served throughout.
        [got] = read_messages([sender], [10], 10 * SLOW)
        assert got == [(OP_BINARY, blob)] * 10
        server.wait_metric("arqonbus_connections", lambda v: v == 1)
    finally:
        for ws in victims:
            ws.close()
    m = server.metrics()
    assert closed_total(m) - closed_total(before) == 40
    reasons = {k: v - closed_by_reason(before)[k] for k, v in closed_by_reason(m).items()}
    assert reasons["peer_gone"] + reasons["io_error"] == 40, reasons
    assert reasons["peer_gone"] >= 10  # at least the FINs
    assert m["arqonbus_protocol_errors_total{code=\"1002\"}"] == before["arqonbus_protocol_errors_total{code=\"1002\"}"]
    sender.send_frame(OP_CLOSE, close_payload(1000))
    assert sender.expect_close(5 * SLOW) == (1000, "")
    sender.close()
    server.wait_metric("arqonbus_connections", lambda v: v == 0)
    assert health(server)["status"] == "ok"
    echo_works(server)


# ---- telemetry port ----------------------------------------------------------------

def test_telemetry_port_takes_websocket_clients(server):
    # A plain TCP connection is accepted.
    with socket.create_connection(("127.0.0.1", server.telemetry_port), timeout=5 * SLOW):
        pass
    with RawWS(server.port) as bus, RawWS(server.telemetry_port) as tele:
        assert health(server)["connections"] == 2
        # Pings are answered; messages sent there go nowhere: not back to the
        # sender (the pong comes next) and not to the bus.
        tele.send_frame(OP_TEXT, "into telemetry")
        tele.send_frame(OP_PING, "t")
        assert tele.recv_frame() == (True, OP_PONG, b"t")
        bus.send_frame(OP_TEXT, "on the bus")
        assert bus.recv_message() == (OP_TEXT, b"on the bus")
        # Bus messages are not sent to telemetry clients either.
        tele.send_frame(OP_PING, "u")
        assert tele.recv_frame() == (True, OP_PONG, b"u")
        tele.send_frame(OP_CLOSE, close_payload(1000))
        assert tele.expect_close(5 * SLOW) == (1000, "")
        tele.wait_eof(5 * SLOW)
    server.wait_metric("arqonbus_connections", lambda v: v == 0)
