"""The telemetry stream, client telemetry and agent activity.

What a monitoring client on the telemetry port observes: a welcome naming
the event types it gets, then one telemetry envelope ("type": "telemetry",
"eventType", "payload") for each client connected and disconnected, channel
created and deleted, join and leave, command executed (name, duration,
result), error, protocol violation, slow-consumer close, and a stats snapshot
every telemetry_stats_interval; only the types it asked for with
?events=a,b (an unknown type refuses the upgrade with 400). Telemetry
envelopes sent by bus clients go to integriguard:telemetry-stream and to
monitors (category client_telemetry, keeping the client's own eventType);
invalid ones get an error. ai-agent and service clients (not human or
dashboard ones) produce agent_activity envelopes on
integriguard:dashboard-events. A monitor that does not read loses events
beyond --telemetry-queue (counted in arqonbus_telemetry_dropped_total) while
the bus keeps routing. A stats line is logged every --stats-log-interval.

Every envelope received goes through envelopes.check(). Times are measured
with time.monotonic() from just before the action that causes an event to
just after the event was read: an upper bound on how long the event took,
checked against the issue's 500 ms (times SLOW under ASan) as a liveness
bound, never as a performance figure.
"""
import asyncio
import datetime
import json
import re
import signal
import socket
import time

import websockets

from conftest import SLOW
import envelopes
from envelopes import Bus, check, error_code
from rawws import OP_TEXT, RawWS, close_payload, frame, upgrade_request
from wsutil import connect_many, reset

LATENCY = 0.5 * SLOW    # the issue: events reach telemetry clients within 500 ms
TIMEOUT = 5.0 * SLOW    # how long a test waits for anything at all
ALL_EVENTS = ["client_connected", "client_disconnected", "channel_created", "channel_deleted", "client_joined",
              "client_left", "command_executed", "error", "protocol_violation", "slow_consumer", "stats",
              "client_telemetry", "agent_activity"]
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
REMOTE = re.compile(r"^127\.0\.0\.1:\d+$")
TELEMETRY_CHANNEL = "integriguard:telemetry-stream"
DASHBOARD_CHANNEL = "integriguard:dashboard-events"

def close_of(ws):
    return envelopes.close_of(ws, TIMEOUT)


def wall(ts):
    """Seconds since the epoch of a server timestamp."""
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


class Monitor:
    """A monitoring client on the telemetry port, on a raw socket.

    It reads and checks the welcome. Every envelope read after it must be a
    telemetry envelope; each is kept, with the time it was read, in a backlog
    until a test takes it, so that tests can wait for events in any order."""

    def __init__(self, server, events=None, query=None, rcvbuf=None):
        path = "/?" + query if query is not None else "/?events=" + ",".join(events) if events else "/"
        if rcvbuf:
            self.ws = connect_many(server.telemetry_port, 1, timeout=TIMEOUT, rcvbuf=rcvbuf, path=path)[0]
        else:
            self.ws = RawWS(server.telemetry_port, timeout=TIMEOUT, path=path)
        self.backlog = []
        self.welcome = self._read(TIMEOUT)
        p = self.welcome["payload"]
        assert self.welcome["type"] == "system" and p["event"] == "welcome", self.welcome
        assert "eventType" not in self.welcome and "from" not in self.welcome, self.welcome

    def _read(self, timeout):
        self.ws.sock.settimeout(timeout)
        op, payload = self.ws.recv_message()
        assert op == OP_TEXT, "a monitor got opcode %r: %r" % (op, payload[:200])
        return check(payload)

    def pull(self, timeout):
        """Reads one more envelope into the backlog."""
        env = self._read(timeout)
        assert env["type"] == "telemetry", "a monitor got a non-telemetry envelope: %r" % env
        self.backlog.append((time.monotonic(), env))
        return env

    def wait_for(self, t0, event_type, **match):
        """Takes the first event of 'event_type' whose payload has the items of
        'match' (read already or read now), and checks that it was read within
        LATENCY of 't0', a time.monotonic() taken before the action that caused
        it. Returns the envelope."""
        deadline = time.monotonic() + TIMEOUT
        i = 0
        while True:
            while i < len(self.backlog):
                at, env = self.backlog[i]
                if env["eventType"] == event_type and all(env["payload"].get(k) == v for k, v in match.items()):
                    del self.backlog[i]
                    assert at - t0 <= LATENCY, "%s arrived %.3f s after the action (bound %.1f s): %r" % (
                        event_type, at - t0, LATENCY, env)
                    return env
                i += 1
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout()
                self.pull(left)
            except socket.timeout:
                raise AssertionError("no %s event with %r within %.0f s; unclaimed: %s" % (
                    event_type, match, TIMEOUT, json.dumps([e for _, e in self.backlog])[:3000]))

    def drain(self, quiet=0.3):
        """Reads until nothing arrives for 'quiet' seconds; returns (and
        forgets) every envelope in the backlog."""
        try:
            while True:
                self.pull(quiet)
        except socket.timeout:
            pass
        out = [env for _, env in self.backlog]
        self.backlog = []
        return out

    def close(self):
        self.ws.close()


def types(envs):
    return [e["eventType"] for e in envs]


def check_client_fields(p, client_id, client_type, screen_name=None):
    assert p["client_id"] == client_id and p["client_type"] == client_type, p
    if screen_name is None:
        assert "screen_name" not in p, p
    else:
        assert p["screen_name"] == screen_name, p
    assert ISO.match(p["connected_at"]) and ISO.match(p["last_activity"]), p
    assert p["last_activity"] >= p["connected_at"], p
    assert REMOTE.match(p["remote"]), p


def refused(port, path):
    """The HTTP answer (status, headers, body) to an upgrade request for 'path'."""
    ws = RawWS(port, upgrade=False, timeout=TIMEOUT)
    try:
        req, _ = upgrade_request(path=path)
        ws.send(req)
        return ws.read_http_response()
    finally:
        ws.close()


# ---- the welcome -------------------------------------------------------------

def test_welcome_names_the_events_and_the_settings(make_server):
    default = make_server()
    tuned = make_server(args=["--telemetry-queue", "8KiB", "--telemetry-stats-interval", "1500ms"])
    mon = Monitor(default)
    assert mon.welcome["payload"]["events"] == ALL_EVENTS
    assert mon.welcome["payload"]["stats_interval_ms"] == 5000
    assert mon.welcome["payload"]["queue_limit"] == 256 * 1024
    some = Monitor(tuned, events=["stats", "client_connected"])
    # In the server's order, whatever the order asked.
    assert some.welcome["payload"]["events"] == ["client_connected", "stats"]
    assert some.welcome["payload"]["stats_interval_ms"] == 1500
    assert some.welcome["payload"]["queue_limit"] == 8192
    assert default.metrics()["arqonbus_telemetry_clients"] == 1
    assert tuned.metrics()["arqonbus_telemetry_clients"] == 1
    mon.close()
    some.close()


# ---- what the bus reports ----------------------------------------------------

def test_client_channel_and_command_events_with_their_fields(make_server):
    server = make_server(args=["--channel-ttl", "0"])
    mon = Monitor(server)

    t0 = time.monotonic()
    ada = Bus(server.port, client_id="ada", screen_name="Ada L", channel="lab:bench")
    p = mon.wait_for(t0, "client_connected", client_id="ada")["payload"]
    check_client_fields(p, "ada", "human", "Ada L")
    assert p["initial_channel"] == "lab:bench"
    created = mon.wait_for(t0, "channel_created", room="lab", channel="bench")
    assert created["payload"]["bootstrap"] is False
    joined = mon.wait_for(t0, "client_joined", client_id="ada")
    assert joined["payload"] == {"client_id": "ada", "client_type": "human", "room": "lab", "channel": "bench",
                                 "members": 1}
    # Ids sort by creation: the channel exists before anyone joins it.
    assert created["id"] < joined["id"]

    t0 = time.monotonic()
    bob = Bus(server.port, client_id="bob", client_type="service")
    p = mon.wait_for(t0, "client_connected", client_id="bob")["payload"]
    check_client_fields(p, "bob", "service")
    assert "initial_channel" not in p

    t0 = time.monotonic()
    bob.join("lab:bench")
    joined = mon.wait_for(t0, "client_joined", client_id="bob")["payload"]
    assert joined == {"client_id": "bob", "client_type": "service", "room": "lab", "channel": "bench", "members": 2}
    done = mon.wait_for(t0, "command_executed", command="join_channel", client_id="bob")["payload"]
    assert done["result"] == "ok"
    assert isinstance(done["duration_ms"], (int, float)) and 0 <= done["duration_ms"] < 60000, done
    assert ada.recv()["payload"]["event"] == "client_joined"

    t0 = time.monotonic()
    reply = bob.command("leave_channel", {"room": "lab", "channel": "bench"})
    assert reply["type"] == "system" and reply["payload"]["left"] is True, reply
    left = mon.wait_for(t0, "client_left", client_id="bob")["payload"]
    assert left == {"client_id": "bob", "client_type": "service", "room": "lab", "channel": "bench", "members": 1}
    assert mon.wait_for(t0, "command_executed", command="leave_channel")["payload"]["result"] == "ok"
    assert ada.recv()["payload"]["event"] == "client_left"

    # A command that fails: its result is the error code, and the error is reported too.
    t0 = time.monotonic()
    reply = bob.command("leave_channel", {"room": "lab", "channel": "bench"})
    assert error_code(reply) == "not_found"
    done = mon.wait_for(t0, "command_executed", command="leave_channel")["payload"]
    assert done["result"] == "not_found" and done["client_id"] == "bob"
    err = mon.wait_for(t0, "error", client_id="bob")["payload"]
    assert err["code"] == "not_found" and err["command"] == "leave_channel"
    assert err["correlation_id"] == reply["correlation_id"] and err["message"] == reply["payload"]["message"]

    t0 = time.monotonic()
    assert bob.command("create_channel", {"room": "lab", "channel": "new"})["type"] == "system"
    assert mon.wait_for(t0, "channel_created", room="lab", channel="new")["payload"]["bootstrap"] is False
    assert mon.wait_for(t0, "command_executed", command="create_channel")["payload"]["result"] == "ok"
    t0 = time.monotonic()
    assert bob.command("delete_channel", {"room": "lab", "channel": "new"})["type"] == "system"
    assert mon.wait_for(t0, "channel_deleted", room="lab", channel="new")["payload"]["bootstrap"] is False
    assert mon.wait_for(t0, "command_executed", command="delete_channel")["payload"]["result"] == "ok"

    # ada leaves with a close handshake: her channel (ttl 0) goes with her.
    t0 = time.monotonic()
    ada.ws.send_frame(0x8, close_payload(1000))
    assert close_of(ada.ws) == (1000, "")
    p = mon.wait_for(t0, "client_disconnected", client_id="ada")["payload"]
    check_client_fields(p, "ada", "human", "Ada L")
    assert p["subscriptions"] == ["lab:bench"]
    assert mon.wait_for(t0, "client_left", client_id="ada")["payload"]["members"] == 0
    mon.wait_for(t0, "channel_deleted", room="lab", channel="bench")
    ada.close()

    # bob's connection is reset.
    t0 = time.monotonic()
    reset(bob.ws.sock)
    p = mon.wait_for(t0, "client_disconnected", client_id="bob")["payload"]
    assert p["subscriptions"] == []
    # Nothing else about clients or channels was reported.
    rest = [e for e in mon.drain() if e["eventType"] not in ("agent_activity",)]
    assert rest == [], rest
    assert server.metrics()["arqonbus_telemetry_events_total"] >= 20
    mon.close()


def test_errors_and_protocol_violations(server):
    mon = Monitor(server, events=["error", "protocol_violation"])
    before = server.metrics()
    bus = Bus(server.port, client_id="clumsy")

    t0 = time.monotonic()
    bus.send("{not json")
    assert error_code(bus.recv()) == "invalid_json"
    err = mon.wait_for(t0, "error", client_id="clumsy")["payload"]
    assert err["code"] == "invalid_json" and err["message"]
    t0 = time.monotonic()
    bus.send_binary(b"\x00\x01")
    assert error_code(bus.recv()) == "unsupported_frame"
    assert mon.wait_for(t0, "error", client_id="clumsy")["payload"]["code"] == "unsupported_frame"

    # An unmasked frame on the bus port: 1002.
    t0 = time.monotonic()
    bus.ws.send(frame(0x1, b'{"type":"event"}', mask=False))
    code, _ = close_of(bus.ws)
    assert code == 1002
    v = mon.wait_for(t0, "protocol_violation", client_id="clumsy")["payload"]
    assert v["close_code"] == 1002 and v["port"] == "bus" and v["reason"], v
    assert REMOTE.match(v["remote"]), v
    bus.close()

    # Invalid UTF-8 from a client with a server-assigned id: 1007.
    other = Bus(server.port)
    t0 = time.monotonic()
    other.ws.send_frame(0x1, b'{"type":"event","payload":{"x":"\xc3\x28"}}')
    code, _ = close_of(other.ws)
    assert code == 1007
    v = mon.wait_for(t0, "protocol_violation", client_id=other.id)["payload"]
    assert v["close_code"] == 1007 and v["port"] == "bus"
    other.close()

    # A monitor breaking the protocol on the telemetry port is reported too.
    rude = Monitor(server, events=["stats"])
    t0 = time.monotonic()
    rude.ws.send(frame(0x1, b"hello", mask=False))
    code, _ = close_of(rude.ws)
    assert code == 1002
    v = mon.wait_for(t0, "protocol_violation", port="telemetry")["payload"]
    assert v["close_code"] == 1002 and REMOTE.match(v["remote"]), v
    rude.close()

    assert mon.drain() == []
    after = server.metrics()
    for code, n in (("1002", 2), ("1007", 1), ("1009", 0)):
        key = 'arqonbus_protocol_errors_total{code="%s"}' % code
        assert after[key] - before[key] == n, key
    mon.close()


def test_slow_consumer_close_is_reported(make_server):
    server = make_server(args=["--max-outbound-queue", "64KiB", "--write-timeout", "60s"])
    mon = Monitor(server, events=["slow_consumer"])
    slow = connect_many(server.port, 1, timeout=TIMEOUT, rcvbuf=4096, path="/?client_id=sloth&channel=lab:slow")[0]
    pub = Bus(server.port)
    before = server.metrics()["arqonbus_slow_consumer_closes_total"]
    body = {"type": "event", "room": "lab", "channel": "slow", "payload": {"pad": "x" * 12000}}
    env = None
    for _ in range(200):  # at most 200 * 10 * 12 KB = 24 MB
        for _ in range(10):
            pub.send(body)
        try:
            env = mon.pull(0.05)
            break
        except socket.timeout:
            pass
    assert env is not None, "no slow_consumer event:\n" + server.log()[-2000:]
    read_at = time.time()
    p = env["payload"]
    assert env["eventType"] == "slow_consumer"
    assert p["client_id"] == "sloth" and p["port"] == "bus" and REMOTE.match(p["remote"]), p
    assert isinstance(p["queued_bytes"], int) and p["queued_bytes"] >= 0, p
    # The event's own timestamp (the same clock as ours) bounds its delay.
    assert read_at - wall(env["timestamp"]) <= LATENCY + 0.002, (read_at, env)
    assert server.metrics()["arqonbus_slow_consumer_closes_total"] == before + 1
    assert pub.command("ping")["command"] == "pong"
    slow.close()
    mon.close()


# ---- stats -------------------------------------------------------------------

def test_stats_snapshots_every_interval_agree_with_the_metrics(make_server):
    server = make_server(args=["--telemetry-stats-interval", "1s"])
    silent = make_server(args=["--telemetry-stats-interval", "0"])
    mon = Monitor(server, events=["stats"])
    quiet = Monitor(silent, events=["stats"])
    assert mon.welcome["payload"]["stats_interval_ms"] == 1000
    assert quiet.welcome["payload"]["stats_interval_ms"] == 0
    a = Bus(server.port, channel="lab:s")
    b = Bus(server.port, channel="lab:s")
    a.send({"type": "event", "payload": {"n": 1}})
    a.send("nonsense")
    assert b.recv()["type"] == "event"
    err, skipped = a.recv_until(lambda e: e["type"] == "error")
    assert error_code(err) == "invalid_json" and [e["payload"]["event"] for e in skipped] == ["client_joined"]
    t0 = time.monotonic()
    done = time.time()
    # Snapshots taken before the traffic was over are skipped: the next one
    # comes within an interval.
    deadline = t0 + 1.0 + 2 * LATENCY
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no stats snapshot within an interval (1 s) of the traffic"
        env = mon.pull(left)
        assert env["eventType"] == "stats", env
        if wall(env["timestamp"]) > done:
            break
    first = env
    t1 = time.monotonic()
    second = mon.pull(1.0 + 2 * LATENCY)  # the next one, about an interval later
    assert second["eventType"] == "stats"
    assert time.monotonic() - t1 <= 1.0 + 2 * LATENCY
    m = server.metrics()
    for snap in (first["payload"], second["payload"]):
        assert set(snap) >= {"connections", "clients", "telemetry_clients", "rooms", "channels", "messages_received",
                             "messages_delivered", "history_messages", "bytes_in", "bytes_out", "telemetry_dropped"}
        assert snap["connections"] == 3 == m["arqonbus_connections"]
        assert snap["clients"] == 2 == m["arqonbus_clients"]
        assert snap["telemetry_clients"] == 1 == m["arqonbus_telemetry_clients"]
        assert snap["rooms"] == m["arqonbus_rooms"] and snap["channels"] == m["arqonbus_channels"]
        assert snap["history_messages"] == 1 == m["arqonbus_history_messages"]
        assert snap["telemetry_dropped"] == 0 == m["arqonbus_telemetry_dropped_total"]
        # The bus is idle: what came in is final.
        assert snap["bytes_in"] == m["arqonbus_received_bytes_total"]
        assert snap["messages_received"] == sum(
            v for k, v in m.items() if k.startswith("arqonbus_messages_received_total{"))
        assert snap["messages_delivered"] == sum(
            v for k, v in m.items() if k.startswith("arqonbus_messages_delivered_total{"))
    assert second["payload"]["bytes_out"] > first["payload"]["bytes_out"]  # the snapshots themselves
    assert wall(second["timestamp"]) > wall(first["timestamp"])
    # With interval 0, none at all (the other server's two intervals have passed).
    assert quiet.drain(0.05) == []
    for c in (a, b, mon, quiet):
        c.close()


LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def stats_lines(server):
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("msg") == "stats":
                out.append({k: str(v) for k, v in rec.items()})
        elif "msg=stats" in line:
            out.append({k: v.strip('"') for k, v in LOGFMT_FIELD.findall(line)})
    return out


def test_stats_log_line_every_interval(make_server):
    logfmt = make_server(args=["--stats-log-interval", "1s"])
    jsonl = make_server(args=["--stats-log-interval", "1s", "--log-format", "json"])
    off = make_server(args=["--stats-log-interval", "0"])
    default = make_server()
    clients = [Bus(s.port, channel="lab:log") for s in (logfmt, jsonl, off, default)]
    deadline = time.monotonic() + 2.0 + 3 * LATENCY
    while time.monotonic() < deadline and (len(stats_lines(logfmt)) < 2 or len(stats_lines(jsonl)) < 2):
        time.sleep(0.05)
    for s in (logfmt, jsonl):
        lines = stats_lines(s)
        assert len(lines) >= 2, "fewer than two stats lines in 2 s with interval 1s:\n" + s.log()
        m = s.metrics()
        last = lines[-1]
        assert last["level"] == "info" and last["component"] == "stats", last
        assert ISO.match(last["time"]), last
        assert int(last["clients"]) == 1 and int(last["connections"]) == 1, last
        assert int(last["channels"]) == m["arqonbus_channels"] and int(last["rooms"]) == m["arqonbus_rooms"], last
        for k in ("messages_received", "messages_delivered", "history_messages", "bytes_in", "bytes_out",
                  "telemetry_dropped"):
            assert int(last[k]) >= 0, (k, last)
        assert int(last["messages_delivered"]) >= 1  # the welcome
    # Interval 0 logs none; the default (60 s) none this early.
    assert stats_lines(off) == [] and stats_lines(default) == []
    for c in clients:
        c.close()


# ---- telemetry from clients --------------------------------------------------

def test_client_telemetry_reaches_the_channel_and_the_monitors(server):
    everything = Monitor(server)
    category = Monitor(server, events=["client_telemetry"])
    stats_only = Monitor(server, events=["stats"])
    sub = Bus(server.port, client_id="watcher", client_type="dashboard", channel=TELEMETRY_CHANNEL)
    sender = Bus(server.port, client_id="probe-1")
    before = server.metrics()
    sent = {"type": "telemetry", "id": "arq_tel1", "eventType": "stats", "payload": {"cpu": 0.25, "mem": [1, 2]},
            "metadata": {"host": "h1"}}
    t0 = time.monotonic()
    sender.send(sent)
    got = sub.recv()
    assert got["type"] == "telemetry" and got["eventType"] == "stats" and got["from"] == "probe-1", got
    assert (got["room"], got["channel"]) == ("integriguard", "telemetry-stream")
    assert got["id"] == "arq_tel1" and got["payload"] == sent["payload"] and got["metadata"] == sent["metadata"]
    assert ISO.match(got["timestamp"])
    # Stored in the channel's history, so it carries its position there, as
    # its last member.
    assert list(got)[-1] == "position" and re.match(r"^[1-9][0-9]*$", got["position"]), got
    # Monitors get the same envelope without the position; the category is
    # client_telemetry even though the client's eventType is "stats".
    for mon in (everything, category):
        env = mon.wait_for(t0, "stats", cpu=0.25)
        assert "position" not in env, env
        assert dict(env, position=got["position"]) == got, (env, got)
    assert stats_only.drain(0.2) == []
    # Not back to the sender; kept in the channel's history.
    assert sender.command("ping")["command"] == "pong"
    assert sender.skipped == []
    hist = sub.command("history", {"room": "integriguard", "channel": "telemetry-stream"})["payload"]
    assert [check(m) for m in hist["messages"]] == [got]
    after = server.metrics()
    assert after['arqonbus_messages_received_total{type="telemetry"}'] == \
        before['arqonbus_messages_received_total{type="telemetry"}'] + 1
    assert after['arqonbus_messages_delivered_total{type="telemetry"}'] == \
        before['arqonbus_messages_delivered_total{type="telemetry"}'] + 1
    for c in (everything, category, stats_only, sub, sender):
        c.close()


def test_client_telemetry_names_another_channel_it_still_goes_to_the_telemetry_channel(server):
    sub = Bus(server.port, channel=TELEMETRY_CHANNEL)
    other = Bus(server.port, channel="lab:elsewhere")
    sender = Bus(server.port)
    sender.send({"type": "telemetry", "eventType": "disk", "room": "lab", "channel": "elsewhere",
                 "payload": {"free": 10}})
    got = sub.recv()
    assert (got["room"], got["channel"], got["eventType"]) == ("integriguard", "telemetry-stream", "disk"), got
    assert other.command("ping")["command"] == "pong" and other.skipped == []
    for c in (sub, other, sender):
        c.close()


def test_telemetry_and_dashboard_channels_are_configurable(make_server):
    custom = make_server(args=["--telemetry-channel", "ops:tel", "--dashboard-channel", "ops:dash"])
    off = make_server(args=["--telemetry-channel", "", "--dashboard-channel", ""])

    tel = Bus(custom.port, channel="ops:tel")
    dash = Bus(custom.port, channel="ops:dash")
    agent = Bus(custom.port, client_id="a1", client_type="ai-agent")
    assert dash.recv()["payload"] == {"activity": "connected", "client_id": "a1", "client_type": "ai-agent"}
    agent.send({"type": "telemetry", "eventType": "gpu", "payload": {"t": 70}})
    got = tel.recv()
    assert (got["room"], got["channel"], got["eventType"], got["from"]) == ("ops", "tel", "gpu", "a1"), got
    act = dash.recv()
    assert (act["room"], act["channel"]) == ("ops", "dash") and act["payload"]["activity"] == "message_sent", act
    rooms = {r["room"] for r in json.loads(custom.http("/status")[2])["room_details"]}
    assert "integriguard" not in rooms and "ops" in rooms, rooms

    # Empty: monitors only; the envelopes name no room or channel.
    mon = Monitor(off, events=["client_telemetry", "agent_activity"])
    t0 = time.monotonic()
    lone = Bus(off.port, client_id="a2", client_type="service")
    lone.send({"type": "telemetry", "eventType": "gpu", "payload": {"t": 71}})
    assert lone.command("ping")["command"] == "pong" and lone.skipped == []
    env = mon.wait_for(t0, "gpu")
    assert env["from"] == "a2" and "room" not in env and "channel" not in env, env
    for activity in ("connected", "message_sent", "command_run"):
        env = mon.wait_for(t0, "agent_activity", activity=activity)
        assert "room" not in env and "channel" not in env, env
    rooms = {r["room"] for r in json.loads(off.http("/status")[2])["room_details"]}
    assert rooms == {"science"}, rooms
    for c in (tel, dash, agent, mon, lone):
        c.close()


INVALID_TELEMETRY = [
    ({"type": "telemetry", "id": "arq_bad1", "payload": {"a": 1}}, "no eventType"),
    ({"type": "telemetry", "id": "arq_bad2", "eventType": "cpu"}, "no payload"),
    ({"type": "telemetry", "id": "arq_bad3", "eventType": 7, "payload": {}}, "eventType not a string"),
    ({"type": "telemetry", "id": "arq_bad4", "eventType": "cpu", "payload": [1, 2]}, "payload not an object"),
    ({"type": "telemetry", "id": "arq_bad5", "eventType": "cpu", "payload": "x"}, "payload a string"),
    ({"type": "telemetry", "id": "arq_bad6", "eventType": "", "payload": {}}, "empty eventType"),
    ({"type": "telemetry", "id": "arq_bad7", "eventType": "has space", "payload": {}}, "eventType not a name"),
    ({"type": "telemetry", "id": "arq_bad8", "eventType": None, "payload": {}}, "eventType null"),
    ({"type": "telemetry", "id": "arq_bad10", "eventType": "e" * 65, "payload": {}}, "eventType over 64 bytes"),
    ({"type": "command", "id": "arq_bad11", "command": "ping", "eventType": "cpu"}, "eventType on a command"),
    ({"type": "event", "id": "arq_bad9", "room": "lab", "channel": "x", "eventType": "cpu", "payload": {}},
     "eventType on an event"),
]


def test_invalid_client_telemetry_gets_an_error_and_goes_nowhere(server):
    mon = Monitor(server, events=["client_telemetry", "error"])
    sub = Bus(server.port, channel=TELEMETRY_CHANNEL)
    sender = Bus(server.port, client_id="sloppy")
    for env, why in INVALID_TELEMETRY:
        t0 = time.monotonic()
        sender.send(env)
        reply = sender.recv()
        assert error_code(reply) == "invalid_envelope", (why, reply)
        assert reply["correlation_id"] == env["id"], (why, reply)
        assert mon.wait_for(t0, "error", client_id="sloppy", correlation_id=env["id"])["payload"][
            "code"] == "invalid_envelope"
        assert sender.command("ping")["command"] == "pong"  # a valid envelope ends the malformed streak
    # A valid one after them still goes through.
    t0 = time.monotonic()
    sender.send({"type": "telemetry", "eventType": "ok", "payload": {}})
    assert sub.recv()["eventType"] == "ok"
    assert mon.wait_for(t0, "ok")["from"] == "sloppy"
    assert mon.drain(0.2) == []
    assert sub.command("ping")["command"] == "pong" and sub.skipped == []
    for c in (mon, sub, sender):
        c.close()


# ---- agent activity ----------------------------------------------------------

def test_agent_activity_for_agents_and_services_only(server):
    mon = Monitor(server, events=["agent_activity"])
    board = Bus(server.port, client_id="board", client_type="dashboard", channel=DASHBOARD_CHANNEL)
    seen = []

    def session(client_id, client_type):
        t0 = time.monotonic()
        c = Bus(server.port, client_id=client_id, client_type=client_type, screen_name=client_id.title())
        c.send({"type": "event", "room": "lab", "channel": "work", "payload": {"by": client_id}})
        assert c.command("ping")["command"] == "pong"
        c.ws.send_frame(0x8, close_payload(1000))
        close_of(c.ws)
        c.close()
        return t0

    for cid, ctype in (("hu", "human"), ("da", "dashboard")):
        session(cid, ctype)
    # Nothing for them: a ping from the board marks the point in its stream.
    assert board.command("ping")["command"] == "pong"
    assert board.skipped == []
    assert mon.drain(0.2) == []

    for cid, ctype in (("agent-7", "ai-agent"), ("svc-3", "service")):
        t0 = session(cid, ctype)
        expected = [("connected", {}),
                    ("message_sent", {"message_type": "event", "room": "lab", "channel": "work"}),
                    ("command_run", {"command": "ping", "result": "ok"}),
                    ("disconnected", {})]
        for activity, fields in expected:
            env = mon.wait_for(t0, "agent_activity", client_id=cid, activity=activity)
            want = dict({"activity": activity, "client_id": cid, "client_type": ctype, "screen_name": cid.title()},
                        **fields)
            assert env["payload"] == want, env
            assert (env["room"], env["channel"]) == ("integriguard", "dashboard-events"), env
            on_bus = board.recv()
            # The same envelope on the dashboard channel, plus its position in
            # the channel's history (the last member, growing).
            assert list(on_bus)[-1] == "position" and "position" not in env, (on_bus, env)
            assert dict(env, position=on_bus["position"]) == on_bus, (on_bus, env)
            assert not seen or int(on_bus["position"]) > int(seen[-1]["position"]), (on_bus, seen[-1])
            seen.append(on_bus)
    assert mon.drain(0.2) == []
    assert board.command("ping")["command"] == "pong" and board.skipped == []
    # They are the dashboard channel's history, too.
    hist = board.command("history", {"room": "integriguard", "channel": "dashboard-events"})["payload"]
    assert [check(m) for m in hist["messages"]] == seen
    mon.close()
    board.close()


def test_agent_activity_for_private_and_telemetry_messages(server):
    board = Bus(server.port, channel=DASHBOARD_CHANNEL, client_type="dashboard")
    peer = Bus(server.port, client_id="peer")
    agent = Bus(server.port, client_id="ag", client_type="ai-agent")
    assert board.recv()["payload"]["activity"] == "connected"
    agent.send({"type": "private", "to": ["peer"], "payload": {"hi": 1}})
    assert peer.recv()["type"] == "private"
    p = board.recv()["payload"]
    assert (p["activity"], p["message_type"], p["client_id"]) == ("message_sent", "private", "ag"), p
    assert "room" not in p and "channel" not in p, p
    agent.send({"type": "telemetry", "eventType": "mood", "payload": {"ok": True}})
    p = board.recv()["payload"]
    assert (p["activity"], p["message_type"]) == ("message_sent", "telemetry"), p
    for c in (board, peer, agent):
        c.close()


# ---- choosing events ---------------------------------------------------------

def test_events_query_selects_what_a_monitor_gets(server):
    lifecycle = Monitor(server, events=["client_connected", "client_disconnected"])
    commands = Monitor(server, query="events=command_executed&other=ignored")
    membership = Monitor(server, query="events=client_joined%2Cclient_left")
    ignored = Monitor(server, query="foo=bar")
    assert membership.welcome["payload"]["events"] == ["client_joined", "client_left"]
    assert commands.welcome["payload"]["events"] == ["command_executed"]
    assert ignored.welcome["payload"]["events"] == ALL_EVENTS

    t0 = time.monotonic()
    c = Bus(server.port, client_id="cc", channel="lab:q")
    c.join("lab:r")
    c.command("leave_channel", {"room": "lab", "channel": "r"})
    c.send("broken")
    assert error_code(c.recv()) == "invalid_json"
    c.close()
    lifecycle.wait_for(t0, "client_disconnected", client_id="cc")
    membership.wait_for(t0, "client_left", client_id="cc", channel="q")
    got = {m: types(mon.drain(0.2)) for m, mon in
           (("lifecycle", lifecycle), ("commands", commands), ("membership", membership), ("ignored", ignored))}
    assert got["lifecycle"] == ["client_connected"], got  # client_disconnected was taken above
    assert got["commands"] == ["command_executed", "command_executed"], got
    assert sorted(got["membership"]) == ["client_joined", "client_joined", "client_left"], got
    assert set(got["ignored"]) >= {"client_connected", "client_disconnected", "client_joined", "client_left",
                                    "channel_created", "command_executed", "error"}, got
    for m in (lifecycle, commands, membership, ignored):
        m.close()


def test_unknown_event_type_refuses_the_upgrade(server):
    before = server.metrics()
    for query, bad in (("events=client_connected,bogus", "bogus"), ("events=Stats", "Stats"),
                       ("events=client_connected%2Cnope", "nope"), ("events=,", "at least one"),
                       ("events=stats,a%0Ab", 'type "a?b"')):
        status, headers, body = refused(server.telemetry_port, "/?" + query)
        assert status == 400, (query, status, body)
        assert bad.encode() in body, (query, body)
        assert headers.get("connection", "").lower() == "close"
    after = server.metrics()
    assert after['arqonbus_handshake_errors_total{status="400"}'] == \
        before['arqonbus_handshake_errors_total{status="400"}'] + 5
    assert after["arqonbus_telemetry_clients"] == 0
    # The bus port does not read 'events' at all.
    with Bus(server.port, timeout=TIMEOUT, events="bogus") as bus:
        assert bus.command("ping")["command"] == "pong"


def test_a_websockets_library_monitor(server):
    """A third-party client (Python websockets) gets the same stream."""
    async def main():
        async with websockets.connect(server.telemetry_url + "/?events=client_connected,client_disconnected",
                                      open_timeout=TIMEOUT) as ws:
            welcome = check(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert welcome["payload"]["events"] == ["client_connected", "client_disconnected"]
            t0 = time.monotonic()
            with Bus(server.port, client_id="libtest"):
                env = check(await asyncio.wait_for(ws.recv(), TIMEOUT))
                assert env["eventType"] == "client_connected" and env["payload"]["client_id"] == "libtest"
            env = check(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert env["eventType"] == "client_disconnected" and env["payload"]["client_id"] == "libtest"
            assert time.monotonic() - t0 <= 2 * LATENCY
    asyncio.run(main())


def test_monitors_get_1001_at_shutdown(make_server):
    server = make_server()
    mon = Monitor(server)
    bus = Bus(server.port, client_type="ai-agent", channel="lab:end")
    mon.drain(0.1)
    server.proc.send_signal(signal.SIGTERM)
    assert close_of(mon.ws) == (1001, "server shutting down")
    assert close_of(bus.ws) == (1001, "server shutting down")
    mon.close()
    bus.close()
    assert server.stop() == 0


# ---- a monitor that does not keep up -----------------------------------------

def test_a_monitor_that_never_reads_loses_events_counted_while_the_bus_routes(make_server):
    server = make_server(args=["--telemetry-queue", "64KiB", "--telemetry-stats-interval", "0",
                               "--write-timeout", "60s"])
    stalled = Monitor(server, rcvbuf=4096)
    m0 = server.metrics()
    assert m0["arqonbus_telemetry_events_total"] == 0 and m0["arqonbus_telemetry_dropped_total"] == 0
    sub = Bus(server.port, channel=TELEMETRY_CHANNEL)
    pub = Bus(server.port, client_id="firehose")
    # 5.2 MB: more than the kernel's socket buffers (at most 4 MiB to send,
    # tcp_wmem) and the 64 KiB telemetry queue can hold for the monitor.
    n, per_round = 320, 20
    for i in range(n):
        pub.send({"type": "telemetry", "eventType": "load", "payload": {"i": i, "pad": "p" * 16000}})
        if i % per_round == per_round - 1:  # paced: the subscriber is never a slow consumer
            for j in range(i - per_round + 1, i + 1):
                got = sub.recv()
                assert got["eventType"] == "load" and got["payload"]["i"] == j, got
    assert pub.command("ping")["command"] == "pong" and pub.skipped == []
    m1 = server.metrics()
    published = m1["arqonbus_telemetry_events_total"]
    dropped = m1["arqonbus_telemetry_dropped_total"]
    # Two client_connected, one client_joined, n client_telemetry, one command_executed.
    assert published == n + 4, m1
    assert dropped > 0, "no telemetry event dropped for a monitor that never read 5 MB"
    assert m1["arqonbus_telemetry_clients"] == 1 and m1["arqonbus_slow_consumer_closes_total"] == 0
    # The monitor now reads: it gets exactly what was not dropped, in order.
    got = stalled.drain(0.5)
    assert len(got) == published - dropped, (len(got), published, dropped)
    loads = [e["payload"]["i"] for e in got if e["eventType"] == "load"]
    assert loads == sorted(loads) and len(set(loads)) == len(loads)
    assert len(loads) < n
    m2 = server.metrics()
    assert m2["arqonbus_telemetry_events_total"] == published and m2["arqonbus_telemetry_dropped_total"] == dropped
    # Caught up, it gets new events again.
    t0 = time.monotonic()
    pub.send({"type": "telemetry", "eventType": "after", "payload": {}})
    stalled.wait_for(t0, "after")
    for c in (stalled, sub, pub):
        c.close()


def test_an_idle_monitor_gets_a_client_telemetry_envelope_larger_than_its_queue(server):
    """A valid telemetry envelope of 300 KB (under max_envelope_size, 512 KiB)
    with the default 256 KiB telemetry queue. The monitor reads and its queue
    is empty: nothing overflows, so nothing should be dropped (as on the bus,
    a single message always enters an empty queue)."""
    mon = Monitor(server, events=["client_telemetry"])
    sub = Bus(server.port, channel=TELEMETRY_CHANNEL)
    pub = Bus(server.port)
    try:
        t0 = time.monotonic()
        pub.send({"type": "telemetry", "eventType": "dump", "payload": {"pad": "d" * 300000}})
        assert sub.recv()["eventType"] == "dump"
        assert server.metrics()["arqonbus_telemetry_dropped_total"] == 0, "dropped for an idle monitor"
        env = mon.wait_for(t0, "dump")
        assert len(env["payload"]["pad"]) == 300000
    finally:
        for c in (mon, sub, pub):
            c.close()


def test_stalled_monitors_with_a_telemetry_queue_above_the_outbound_bound(make_server):
    """--telemetry-queue 1MiB with --max-outbound-queue 64KiB (both in their
    documented ranges): two monitors that do not read pass the outbound bound
    before the telemetry one. Whatever happens to them, the bus must keep
    routing and the server keep answering."""
    server = make_server(args=["--telemetry-queue", "1MiB", "--max-outbound-queue", "64KiB",
                               "--telemetry-stats-interval", "0", "--write-timeout", "60s"])
    stalled = [Monitor(server, rcvbuf=4096) for _ in range(2)]
    pub = Bus(server.port, timeout=2 * SLOW)
    hung = False
    try:
        data = b"".join(frame(0x1, json.dumps({"type": "telemetry", "eventType": "load",
                                                "payload": {"i": i, "pad": "p" * 100}}).encode())
                        for i in range(2000))
        pub.ws.send(data)  # one burst of 2000 events, about 300 KB to each monitor
        try:
            assert pub.command("ping")["command"] == "pong"
        except socket.timeout:
            hung = health_or_timeout(server) == "timeout"
            raise AssertionError("no pong within %.0f s after the burst; /health %s" % (
                2 * SLOW, "does not answer either" if hung else "answers"))
        status, _, body = server.http("/health", timeout=2 * SLOW)
        assert status == 200, body
    finally:
        for c in stalled + [pub]:
            c.close()
        if hung:
            server.stop(check=False, timeout=1)  # do not wait 20 s for SIGTERM


def health_or_timeout(server):
    try:
        return server.http("/health", timeout=1)[0]
    except OSError:
        return "timeout"
