"""The arqonbus process: startup banner, signals, churn and abrupt peers.

What an operator observes: the banner on stdout names the three addresses
(logs go to stderr); SIGINT and SIGTERM close every client with 1001 and the
process exits 0 within drain_timeout; thousands of connections opened and
closed leave the server at zero connections and healthy; clients that vanish
mid-frame, with a FIN or a reset, are counted as closed and cost nothing
else; and the telemetry port takes WebSocket clients of its own.

Clients that vanish also leave every channel they joined, and the remaining
members are told (client_left, reason disconnected); the status command's
figures stay consistent through churn. Every bus connection gets a welcome
envelope first; the tests read it and check every envelope they receive
against the published schema.
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
from busprobe import (bus_serves, connect_paths, echo_bus, echo_roundtrip, expect_only_close, members_of,
                      nothing_pending, read_welcome, status)
from conftest import SLOW, Server
from envelopes import BOOTSTRAP, Bus, check, query
from rawws import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWS, close_payload, frame, upgrade_request)
from wsutil import closed_by_reason, closed_total, connect_many, http_request, read_messages, reset, type_deltas

SHUTDOWN = (1001, "server shutting down")
# Every kind of telemetry event, in the order a monitoring client's welcome lists them.
TELEMETRY_EVENTS = ["client_connected", "client_disconnected", "channel_created", "channel_deleted", "client_joined",
                    "client_left", "command_executed", "error", "protocol_violation", "slow_consumer", "stats",
                    "client_telemetry", "agent_activity"]


def health(server):
    status, _, body = http_request(server.http_port, b"GET /health HTTP/1.1\r\n\r\n", 5 * SLOW)
    assert status == 200, body
    return json.loads(body)


def echo_works(server):
    """A new client gets its welcome, its own event back and a command answered."""
    bus_serves(server.port, 5 * SLOW)


def is_welcome(env):
    return env["type"] == "system" and env["payload"].get("event") == "welcome"


def read_telemetry_welcome(ws, events, timeout):
    """Reads and checks the welcome a monitoring client gets first: a system
    envelope that lists the kinds of event it will get ('events')."""
    env = read_welcome(ws, timeout)
    assert env["payload"]["events"] == events, env
    assert "room" not in env and "channel" not in env and "eventType" not in env, env
    return env


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
    # The monitoring client asks only for events that do not happen here, so
    # that after its welcome it is due nothing but the close.
    quiet = ["protocol_violation", "slow_consumer"]
    raws = connect_many(server.port, 3) + connect_many(server.telemetry_port, 1, path="/?events=" + ",".join(quiet))
    for ws in raws[:3]:
        read_welcome(ws, 5 * SLOW)
    read_telemetry_welcome(raws[3], quiet, 5 * SLOW)

    async def run():
        libs = [await websockets.connect(server.url, open_timeout=5 * SLOW, ping_interval=None) for _ in range(2)]
        for ws in libs:
            assert is_welcome(check(await asyncio.wait_for(ws.recv(), 5 * SLOW)))
        assert health(server)["connections"] == 6
        start = time.monotonic()
        server.proc.send_signal(sig)
        # Bus and telemetry clients alike get the close frame and nothing else.
        for ws in raws:
            assert expect_only_close(ws, 5 * SLOW) == SHUTDOWN
            ws.send_frame(OP_CLOSE, close_payload(1001))
            ws.wait_eof(5 * SLOW)
            ws.close()
        for ws in libs:
            await asyncio.wait_for(ws.wait_closed(), 5 * SLOW)
            assert (ws.close_code, ws.close_reason) == SHUTDOWN
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()  # nothing came between the welcome and the close
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


def test_shutdown_does_not_announce_departures(make_server):
    # All members of one channel are closed at once: none of them may get
    # client_left notifications about the others before its own 1001.
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "10s"])
    n = 40
    members = [Bus(server.port, channel="science:general") for _ in range(n)]
    try:
        # Everyone reads the joins up to the last member's: nothing else is queued.
        for m in members[:-1]:
            m.recv_until(lambda e: e["type"] == "system" and e["payload"].get("event") == "client_joined"
                         and e["payload"]["client_id"] == members[-1].id)
        server.proc.send_signal(signal.SIGTERM)
        for m in members:
            assert expect_only_close(m.ws, 10 * SLOW) == SHUTDOWN
            m.ws.send_frame(OP_CLOSE, close_payload(1001))
            m.ws.wait_eof(5 * SLOW)
            m.close()
        assert server.proc.wait(10 * SLOW) == 0
    finally:
        for m in members:
            m.close()
    assert server.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_exits_0_within_drain_timeout_when_clients_never_answer(make_server, sig):
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "1s"])
    silent = connect_many(server.port, 2)
    try:
        for ws in silent:
            read_welcome(ws, 5 * SLOW)
        assert health(server)["connections"] == 2
        start = time.monotonic()
        server.proc.send_signal(sig)
        for ws in silent:
            assert expect_only_close(ws, 5 * SLOW) == SHUTDOWN
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
    with Bus(server.port, timeout=5 * SLOW) as bus:
        ws = bus.ws
        server.proc.send_signal(signal.SIGTERM)
        assert expect_only_close(ws, 5 * SLOW) == SHUTDOWN
        # The listeners are closed: no new bus or telemetry client is accepted.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5 * SLOW).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.telemetry_port), timeout=5 * SLOW).close()
        ws.send_frame(OP_CLOSE, close_payload(1001))
        ws.wait_eof(5 * SLOW)
    assert server.proc.wait(5 * SLOW) == 0
    assert server.stop() == 0


def test_health_answers_503_while_draining(make_server):
    # The ops port stays open during the drain so that load balancers see the
    # server going away; the bus port is already closed.
    server = make_server(args=["--close-timeout", "30s", "--drain-timeout", "10s"])
    with Bus(server.port, timeout=5 * SLOW) as bus:
        ws = bus.ws
        status, _, body = server.http("/health")
        assert status == 200
        server.proc.send_signal(signal.SIGTERM)
        assert expect_only_close(ws, 5 * SLOW) == SHUTDOWN
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
    for b in range(batches):
        # Each client in a channel of its own: leaving must be undone too.
        channels = ["churn:c%d-%d" % (b, i) for i in range(size)]
        conns = connect_paths(server.port, [query(channel=ch) for ch in channels], timeout=10 * SLOW)
        try:
            for ws, ch in zip(conns, channels):
                assert read_welcome(ws, 5 * SLOW)["payload"]["subscriptions"] == [ch]
            # Half close cleanly, a quarter just go (FIN), a quarter reset.
            clean = conns[: size // 2]
            for ws in clean:
                ws.send_frame(OP_CLOSE, close_payload(1000))
            for ws in clean:
                assert expect_only_close(ws, 5 * SLOW) == (1000, "")
                ws.wait_eof(5 * SLOW)
                ws.close()
            for i, ws in enumerate(conns[size // 2:]):
                if i % 2:
                    reset(ws.sock)
                else:
                    # Everything was read: this close sends a FIN, not a reset.
                    assert nothing_pending(ws)
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
    assert reasons["peer_gone"] >= n // 4, reasons  # at least the FINs
    h = health(server)
    assert (h["status"], h["connections"]) == ("ok", 0)
    # The bus agrees: the only client left is the one asking, every churn
    # channel still exists (channel_ttl) and has no members.
    s = status(server.port, 5 * SLOW)
    assert s["clients"]["total"] == 1, s
    assert s["clients"]["by_type"] == {"human": 1, "ai-agent": 0, "dashboard": 0, "service": 0}, s
    # Rooms: science (the bootstrap channels), integriguard (the telemetry and
    # dashboard channels) and churn.
    assert (s["rooms"], s["channels"]) == (3, len(BOOTSTRAP) + 2 + n), s
    assert s["you"]["subscriptions"] == [], s
    # Delivered: the n welcomes and the asker's; received: the status command.
    assert (s["messages"]["received"], s["messages"]["delivered"]) == (1, n + 1), s
    with Bus(server.port, timeout=5 * SLOW) as bus:
        reply = bus.command("list_channels", room="churn")
        assert bus.skipped == [] and reply["type"] == "system", reply
        listed = reply["payload"]["channels"]
        assert reply["payload"]["count"] == len(listed) == n
        assert sorted(c["room"] + ":" + c["channel"] for c in listed) == sorted(
            "churn:c%d-%d" % (b, i) for b in range(batches) for i in range(size))
        assert [c for c in listed if c["members"] != 0] == []
    echo_works(server)


# ---- abrupt disconnects -----------------------------------------------------------

def test_abrupt_disconnects_are_counted_and_harmless(server):
    before = server.metrics()
    partial = frame(OP_BINARY, b"p" * 1000)[:300]  # header and part of the payload
    # 20 that vanish mid-frame, each in a channel of its own; 20 in the
    # channel the sender publishes to.
    flood = ["flood-%d" % i for i in range(20)]
    victims = (connect_paths(server.port, [query(channel="abrupt:mid%d" % i) for i in range(20)])
               + connect_paths(server.port, [query(client_id=cid, channel="abrupt:flood") for cid in flood]))
    # The sender joins last: it gets no client_joined, only its own events
    # (echo) and the departures.
    sender = echo_bus(server.port, timeout=10 * SLOW, channel="abrupt:flood", client_id="sender")
    sender.send({"type": "command", "command": "channel_info", "room": "abrupt", "channel": "flood", "id": "arq_i"})
    info = sender.recv()
    assert info["correlation_id"] == "arq_i" and info["payload"]["members"] == 21, info
    try:
        for ws in victims[:20]:
            read_welcome(ws, 5 * SLOW)
        # Mid-frame, then a reset (10) or a FIN (10).
        for ws in victims[:20]:
            ws.send(partial)
        time.sleep(0.1)
        for i, ws in enumerate(victims[:20]):
            if i % 2:
                assert nothing_pending(ws)  # so that this is a FIN, not a reset
                ws.close()
            else:
                reset(ws.sock)
        # A reset while messages are on their way to the client (20): they
        # never read what the sender publishes.
        blob = "b" * 60000
        for i in range(10):
            sender.send({"type": "event", "id": "arq_blob%d" % i, "payload": {"data": blob}})
            if i == 4:
                for ws in victims[20:]:
                    reset(ws.sock)
        # A reset in the middle of a handshake: never a WebSocket, not counted.
        half = socket.create_connection(("127.0.0.1", server.port), timeout=5 * SLOW)
        half.sendall(upgrade_request()[0][:40])
        time.sleep(0.05)
        reset(half)
        # The sender is served throughout: its 10 events, in order, and one
        # client_left for each of the 20 that vanished from its channel.
        [got] = read_messages([sender.ws], [30], 10 * SLOW)
        assert {op for op, _ in got} == {OP_TEXT}
        envs = [check(payload) for _, payload in got]
        events = [e for e in envs if e["type"] == "event"]
        left = [e for e in envs if e["type"] == "system"]
        assert [(e["id"], e["from"], e["room"], e["channel"], e["payload"]) for e in events] == [
            ("arq_blob%d" % i, "sender", "abrupt", "flood", {"data": blob}) for i in range(10)]
        assert len(left) == 20, envs
        for e in left:
            assert (e["room"], e["channel"], e["payload"]["event"], e["payload"]["reason"]) == (
                "abrupt", "flood", "client_left", "disconnected"), e
        assert sorted(e["payload"]["client_id"] for e in left) == sorted(flood)
        assert [e["payload"]["members"] for e in left] == list(range(20, 0, -1))
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
    assert members_of(server.port, "abrupt:flood", 5 * SLOW) == ["sender"]
    sender.ws.send_frame(OP_CLOSE, close_payload(1000))
    assert expect_only_close(sender.ws, 5 * SLOW) == (1000, "")
    sender.close()
    server.wait_metric("arqonbus_connections", lambda v: v == 0)
    assert health(server)["status"] == "ok"
    # Nobody is left on the bus or in any of the channels.
    s = status(server.port, 5 * SLOW)
    assert s["clients"]["total"] == 1, s
    with Bus(server.port, timeout=5 * SLOW) as bus:
        reply = bus.command("list_channels", room="abrupt")
        assert reply["type"] == "system" and reply["payload"]["count"] == 21, reply
        assert [c for c in reply["payload"]["channels"] if c["members"] != 0] == []
    echo_works(server)


def wait_client_left(bus, channel, victim):
    """Reads bus's next envelope: the client_left of 'victim' in 'channel'."""
    env = bus.recv()
    room, ch = channel.split(":")
    assert (env["type"], env.get("room"), env.get("channel")) == ("system", room, ch), env
    p = env["payload"]
    assert (p["event"], p["client_id"], p["client_type"], p["reason"]) == (
        "client_left", victim, "ai-agent", "disconnected"), env
    return p["members"]


@pytest.mark.parametrize("how", ["reset", "fin"])
def test_vanished_client_leaves_every_channel_it_joined(server, how):
    """A client that goes without a close frame (a TCP reset, or a FIN) is
    removed from each of its channels, and each channel's remaining members
    are told once, with reason disconnected."""
    before = server.metrics()
    t = 5 * SLOW
    a = Bus(server.port, timeout=t, client_id="watch-a", channel="lab:a")
    ab = Bus(server.port, timeout=t, client_id="watch-ab", channel="lab:a")
    joined = a.recv()
    assert (joined["payload"]["event"], joined["payload"]["client_id"]) == ("client_joined", "watch-ab"), joined
    ab.join("lab:b")
    assert ab.skipped == []
    c = Bus(server.port, timeout=t, client_id="watch-c", channel="field:c")
    bystander = Bus(server.port, timeout=t, client_id="bystander", channel="lab:z")  # same room, not the channels
    victim_id = "victim-" + how
    victim = Bus(server.port, timeout=t, client_id=victim_id, client_type="ai-agent", channel="lab:a")
    victim.join("lab:b")
    victim.join("field:c")
    assert victim.skipped == []
    assert victim.command("status")["payload"]["you"]["subscriptions"] == ["lab:a", "lab:b", "field:c"]
    try:
        # Everyone saw the victim join.
        for bus, channel, members in ((a, "lab:a", 3), (ab, "lab:a", 3), (ab, "lab:b", 2), (c, "field:c", 2)):
            env = bus.recv()
            assert (env["type"], env["room"] + ":" + env["channel"]) == ("system", channel), env
            assert (env["payload"]["event"], env["payload"]["client_id"], env["payload"]["members"]) == (
                "client_joined", victim_id, members), env
        if how == "reset":
            reset(victim.ws.sock)
        else:
            assert nothing_pending(victim.ws)  # so that this is a FIN, not a reset
            victim.ws.sock.close()
        assert wait_client_left(a, "lab:a", victim_id) == 2
        # It is gone, counted once: a FIN ends the TCP connection without a
        # close handshake (peer_gone); a reset may also be a read error.
        reasons = {k: v - closed_by_reason(before)[k] for k, v in closed_by_reason(server.metrics()).items()}
        if how == "fin":
            assert reasons == dict(reasons, peer_gone=1) and sum(reasons.values()) == 1, reasons
        else:
            assert reasons["peer_gone"] + reasons["io_error"] == 1 and sum(reasons.values()) == 1, reasons
        got = {}
        for _ in range(2):
            env = ab.recv()
            got[env["room"] + ":" + env["channel"]] = env
        assert sorted(got) == ["lab:a", "lab:b"]
        for channel, members in (("lab:a", 2), ("lab:b", 1)):
            p = got[channel]["payload"]
            assert (p["event"], p["client_id"], p["client_type"], p["reason"], p["members"]) == (
                "client_left", victim_id, "ai-agent", "disconnected", members), got[channel]
        assert wait_client_left(c, "field:c", victim_id) == 1
        # Once per channel, and nothing to anyone else.
        for bus in (a, ab, c, bystander):
            bus.expect_nothing(0.3)
        assert members_of(server.port, "lab:a", t) == ["watch-a", "watch-ab"]
        assert members_of(server.port, "lab:b", t) == ["watch-ab"]
        assert members_of(server.port, "field:c", t) == ["watch-c"]
        s = status(server.port, t)
        assert s["clients"]["total"] == 5, s  # four watchers and the asker
        assert s["clients"]["by_type"]["ai-agent"] == 0, s
        # The channels still route among those who stayed.
        a.send({"type": "event", "room": "lab", "channel": "a", "id": "arq_after", "payload": {"n": 1}})
        env = ab.recv()
        assert (env["type"], env["id"], env["from"]) == ("event", "arq_after", "watch-a"), env
        a.expect_nothing(0.1)
    finally:
        for bus in (a, ab, c, bystander, victim):
            bus.close()
    server.wait_metric("arqonbus_connections", lambda v: v == 0)


# ---- telemetry port ----------------------------------------------------------------

def test_telemetry_port_takes_websocket_clients(make_server):
    # No periodic stats: what the monitoring client gets is only what the test does.
    server = make_server(args=["--telemetry-stats-interval", "0"])
    # A plain TCP connection is accepted.
    with socket.create_connection(("127.0.0.1", server.telemetry_port), timeout=5 * SLOW):
        pass
    with echo_bus(server.port, timeout=5 * SLOW) as bus, RawWS(server.telemetry_port) as tele:
        assert health(server)["connections"] == 2
        before = server.metrics()
        # Its welcome lists every kind of event (it asked for no subset).
        read_telemetry_welcome(tele, TELEMETRY_EVENTS, 5 * SLOW)
        # Pings are answered; messages sent there go nowhere: not back to the
        # sender (the pong comes next) and not to the bus, even an envelope
        # for a channel a bus client is in.
        tele.send_frame(OP_TEXT, json.dumps({"type": "event", "room": "t", "channel": "echo",
                                             "payload": {"data": "into telemetry"}}))
        tele.send_frame(OP_PING, "t")
        assert tele.recv_frame() == (True, OP_PONG, b"t")
        echo_roundtrip(bus, "on the bus")
        # Bus messages are not sent to telemetry clients either (an event
        # of a human client is no telemetry event).
        tele.send_frame(OP_PING, "u")
        assert tele.recv_frame() == (True, OP_PONG, b"u")
        tele.send_frame(OP_CLOSE, close_payload(1000))
        skipped = []
        assert tele.expect_close(5 * SLOW, skipped=skipped) == (1000, "")
        assert skipped == [], skipped
        tele.wait_eof(5 * SLOW)
        bus.expect_nothing(0.2)
        # The bus counted the echoed event alone, not the message sent to the
        # telemetry port.
        after = server.metrics()
        assert type_deltas(before, after, "arqonbus_messages_received_total") == {"event": 1}
        assert type_deltas(before, after, "arqonbus_messages_delivered_total") == {"event": 1}
    server.wait_metric("arqonbus_connections", lambda v: v == 0)
