"""The limits that keep one client from hurting the others (docs/security.md).

For every limit, going over it gets the documented answer (an HTTP status at
the upgrade, an error envelope, or a close with its code and reason), it is
counted, and at the same time a legitimate pair of clients on the same server
(a publisher and a subscriber, already connected) keeps sending and
receiving. Connections from a second remote address bind their socket to
127.0.0.2, which Linux routes over the loopback like 127.0.0.1.

Times are liveness bounds only (scaled by SLOW under ASan); rate-limit cases
send their burst in one write, so that it arrives in one read with one
arrival time, whatever the speed of the machine.
"""
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from conftest import BIN, SLOW
from envelopes import Bus, check, error_code, query
from rawws import OP_CLOSE, OP_TEXT, RawWS, accept_key, frame, parse_close, upgrade_request
from wsutil import closed_by_reason, connect_many, drain_to_end

TIMEOUT = 5.0 * SLOW
CHANNEL = "science:general"  # a bootstrap channel: it always exists
BOOTSTRAP_CHANNELS = 7 + 2   # the default bootstrap channels, and the telemetry and dashboard ones


def run_bin(args):
    """Runs the binary with 'args' and no ARQONBUS_* variables of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    return subprocess.run([BIN] + args, capture_output=True, text=True, timeout=10 * SLOW, env=env)


def denials(server, limit):
    return server.metrics().get('arqonbus_limit_denials_total{limit="%s"}' % limit, 0)


# ---- the legitimate pair ----------------------------------------------------------

class Pair:
    """A publisher and a subscriber on CHANNEL that must keep working."""

    def __init__(self, server):
        self.pub = Bus(server.port, timeout=TIMEOUT, channel=CHANNEL)
        self.sub = Bus(server.port, timeout=TIMEOUT, channel=CHANNEL)
        self.n = 0

    def works(self):
        """An event from the publisher reaches the subscriber, and the
        publisher's ping is answered."""
        self.n += 1
        tag = "still-%d" % self.n
        self.pub.send({"type": "event", "payload": {"tag": tag}})
        env, _ = self.sub.recv_until(lambda e: e["type"] == "event" and e["payload"].get("tag") == tag)
        assert env["from"] == self.pub.id, env
        reply = self.pub.command("ping")
        assert reply["type"] == "system" and reply["command"] == "pong", reply

    def close(self):
        self.pub.close()
        self.sub.close()


@pytest.fixture
def pair_of():
    pairs = []

    def make(server):
        p = Pair(server)
        pairs.append(p)
        return p

    yield make
    for p in pairs:
        p.close()


# ---- raw upgrades -----------------------------------------------------------------

def raw_socket(port, source=None):
    """A RawWS on a connected socket, not upgraded; 'source' binds it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                 source_address=(source, 0) if source else None)
    ws = RawWS.__new__(RawWS)
    ws.sock, ws.buf, ws.status, ws.headers = s, b"", None, {}
    return ws


def upgrade(port, path="/", host="127.0.0.1", extra="", source=None):
    """Sends an upgrade request; returns (ws, status, headers, body). The
    body is read for error statuses (the connection then ends)."""
    ws = raw_socket(port, source)
    req, key = upgrade_request(path=path, host=host, extra=extra)
    ws.send(req)
    status, headers = ws.read_http_head()
    ws.status, ws.headers = status, headers
    body = b""
    if status == 101:
        assert headers.get("sec-websocket-accept") == accept_key(key)
    else:
        n = int(headers.get("content-length", "0"))
        ws._fill(n)
        body, ws.buf = ws.buf[:n], ws.buf[n:]
    return ws, status, headers, body


def bus_from(port, source, **params):
    """A Bus client whose socket is bound to 'source'."""
    ws, status, headers, body = upgrade(port, path=query(**params), source=source)
    assert status == 101, (status, body)
    b = Bus.__new__(Bus)
    b.ws, b.timeout, b._n = ws, TIMEOUT, 0
    b.welcome = b.recv()
    b.id = b.welcome["payload"]["client_id"]
    return b


def refused(port, want_status, want_body, **kw):
    ws, status, headers, body = upgrade(port, **kw)
    try:
        assert status == want_status, (status, body)
        assert want_body in body.decode(), body
        assert headers.get("connection", "").lower() == "close", headers
    finally:
        ws.close()


# ---- connections in total and per address -------------------------------------------

def test_max_connections_refuses_with_503(make_server, pair_of):
    server = make_server(args=["--max-connections", "3"])
    pair = pair_of(server)
    third = Bus(server.port, timeout=TIMEOUT)
    before = server.metrics()['arqonbus_handshake_errors_total{status="503"}']
    refused(server.port, 503, "connection limit reached")
    # The telemetry port counts in the same total.
    refused(server.telemetry_port, 503, "connection limit reached")
    assert server.metrics()['arqonbus_handshake_errors_total{status="503"}'] == before + 2
    pair.works()
    third.close()
    server.wait_metric("arqonbus_connections", lambda v: v == 2)
    Bus(server.port, timeout=TIMEOUT).close()
    pair.works()


def test_connections_per_address_refused_with_429(make_server, pair_of):
    server = make_server(args=["--max-connections-per-ip", "3"])
    pair = pair_of(server)  # two from 127.0.0.1
    third = Bus(server.port, timeout=TIMEOUT)
    refused(server.port, 429, "too many connections from this address")
    refused(server.port, 429, "max_connections_per_ip")
    assert denials(server, "connections_per_ip") == 2
    assert server.metrics()['arqonbus_handshake_errors_total{status="429"}'] == 2
    assert "limit=connections_per_ip" in server.log() and "addr=127.0.0.1" in server.log()
    # Another address is not affected, and is counted on its own.
    others = [bus_from(server.port, "127.0.0.2", channel=CHANNEL) for _ in range(3)]
    refused(server.port, 429, "too many connections", source="127.0.0.2")
    pair.works()
    env, _ = others[0].recv_until(lambda e: e["type"] == "event" and e["payload"].get("tag") == "still-1")
    assert env["from"] == pair.pub.id
    # Monitoring clients on the telemetry port are not counted per address.
    mon = RawWS(server.telemetry_port, timeout=TIMEOUT)
    mon.close()
    # A closed connection frees its place.
    third.close()
    deadline = time.monotonic() + TIMEOUT
    while True:
        ws, status, _, _ = upgrade(server.port)
        ws.close()
        if status == 101:
            break
        assert status == 429 and time.monotonic() < deadline, status
        time.sleep(0.05)
    for b in others:
        b.close()
    pair.works()


def test_connections_per_address_ipv6(make_server):
    """Listening on '::', IPv4 clients (seen as ::ffff:127.0.0.1) and IPv6
    clients (::1) are counted apart."""
    server = make_server(args=["--host", "::", "--max-connections-per-ip", "1"])

    def attempt(family, addr):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect((addr, server.port))
        ws = RawWS.__new__(RawWS)
        ws.sock, ws.buf, ws.status, ws.headers = s, b"", None, {}
        ws.send(upgrade_request()[0])
        status, _ = ws.read_http_head()
        return ws, status

    v4, status = attempt(socket.AF_INET, "127.0.0.1")
    assert status == 101
    v6, status = attempt(socket.AF_INET6, "::1")
    assert status == 101
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        ws, status = attempt(family, addr)
        assert status == 429, (addr, status)
        ws.close()
    assert "addr=::1" in server.log(), server.log()[-2000:]
    assert denials(server, "connections_per_ip") == 2
    # The first two still work.
    for ws in (v4, v6):
        op, payload = ws.recv_message()
        assert check(payload)["payload"]["event"] == "welcome"
        ws.close()


def test_default_per_address_limit_lets_the_suite_connect(make_server):
    server = make_server()
    conns = connect_many(server.port, 100, timeout=10 * SLOW)
    try:
        assert server.metrics()["arqonbus_connections"] == 100
    finally:
        for ws in conns:
            ws.close()


# ---- Origin ------------------------------------------------------------------------

@pytest.mark.parametrize("port_name", ["port", "telemetry_port"])
def test_foreign_origin_refused_with_403_by_default(make_server, pair_of, port_name):
    server = make_server()
    pair = pair_of(server)
    port = getattr(server, port_name)
    host = "127.0.0.1:%d" % port
    refused(port, 403, "Origin is not allowed", host=host, extra="Origin: http://evil.example\r\n")
    # Same host, another port; another scheme's default port; garbage; null.
    refused(port, 403, "allowed_origins", host=host, extra="Origin: http://127.0.0.1:%d\r\n" % (port + 1))
    refused(port, 403, "allowed_origins", host=host, extra="Origin: http://127.0.0.1\r\n")
    refused(port, 403, "allowed_origins", host=host, extra="Origin: null\r\n")
    refused(port, 403, "allowed_origins", host=host, extra="Origin: 127.0.0.1:%d\r\n" % port)
    assert denials(server, "origin") == 5
    assert server.metrics()['arqonbus_handshake_errors_total{status="403"}'] == 5
    assert "limit=origin" in server.log() and "origin=http://evil.example" in server.log()
    assert "remote=127.0.0.1:" in server.log()
    # A page served from the host and port it connects to (same origin), and
    # a client that sends no Origin at all (not a browser), are accepted.
    for extra in ("Origin: http://127.0.0.1:%d\r\n" % port, "Origin: HTTP://127.0.0.1:%d\r\n" % port, ""):
        ws, status, _, body = upgrade(port, host=host, extra=extra)
        assert status == 101, (extra, status, body)
        ws.close()
    pair.works()


def test_allowed_origins_list(make_server, pair_of):
    server = make_server(args=["--allowed-origins", "https://app.example, http://localhost:8080"])
    pair = pair_of(server)
    host = "127.0.0.1:%d" % server.port
    for origin in ("https://app.example", "https://APP.example:443", "http://localhost:8080"):
        ws, status, _, body = upgrade(server.port, host=host, extra="Origin: %s\r\n" % origin)
        assert status == 101, (origin, status, body)
        ws.close()
    for origin in ("http://app.example", "https://app.example:8443", "http://127.0.0.1:%d" % server.port):
        refused(server.port, 403, "allowed_origins", host=host, extra="Origin: %s\r\n" % origin)
    pair.works()
    star = make_server(args=["--allowed-origins", "*"])
    ws, status, _, _ = upgrade(star.port, extra="Origin: http://anything.example\r\n")
    assert status == 101
    ws.close()


def test_invalid_allowed_origins_stop_the_start():
    for value in ("https://app.example/", "app.example", "http://a:99999"):
        r = run_bin(["--allowed-origins", value])
        assert r.returncode == 2, (value, r.stderr)
        assert "allowed_origins" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ---- rate ------------------------------------------------------------------------

def burst(bus, envs):
    """Sends every envelope of 'envs' in one write."""
    bus.ws.send(b"".join(frame(OP_TEXT, json.dumps(e).encode()) for e in envs))


def test_rate_limit_messages(make_server, pair_of):
    server = make_server(args=["--rate-limit-messages", "20"])
    pair = pair_of(server)
    flood = Bus(server.port, timeout=TIMEOUT, channel="lab:flood")
    watcher = Bus(server.port, timeout=TIMEOUT, channel="lab:flood")
    assert flood.welcome["payload"]["limits"]["rate_limit_messages"] == 20
    # Commands count as much as events: 20 events and 20 pings, one write.
    envs = [{"type": "event", "id": "arq_ev%d" % i, "payload": {"i": i}} for i in range(20)]
    envs += [{"type": "command", "command": "ping", "id": "arq_ping%d" % i} for i in range(20)]
    burst(flood, envs)
    answers = {}
    while len(answers) < 20:  # a reply or an error for each ping
        env = flood.recv()
        if env["type"] == "error":
            assert error_code(env) == "rate_limited", env
            answers.setdefault(env["correlation_id"], env)
        elif env.get("command") == "pong":
            answers[env["correlation_id"]] = env
    limited = {k: v for k, v in answers.items() if v["type"] == "error"}
    # The 20 events took the whole bucket: the pings (bar the few tokens
    # that refilled while the burst was read) are refused.
    assert len(limited) >= 15, answers
    for cid, env in limited.items():
        p = env["payload"]
        assert (p["limit"], p["max"]) == ("rate_limit_messages", 20), env
        assert 0 < p["retry_after_ms"] <= 1000, env
        assert "retry after" in p["message"], env
    flood.expect_nothing(0.2)
    got = [watcher.recv_until(lambda e: e["type"] == "event")[0]["payload"]["i"] for _ in range(20)]
    assert got == list(range(20))
    pair.works()
    # After the time it was told, the same request passes.
    time.sleep(max(e["payload"]["retry_after_ms"] for e in limited.values()) / 1000)
    reply = flood.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply
    assert denials(server, "rate") == len(limited)
    assert server.metrics()['arqonbus_errors_total{code="rate_limited"}'] == len(limited)
    for b in (flood, watcher):
        b.close()


def test_rate_limit_bytes(make_server, pair_of):
    server = make_server(args=["--rate-limit-bytes", "1KiB"])
    pair = pair_of(server)
    flood = Bus(server.port, timeout=TIMEOUT, channel="lab:bytes")
    assert flood.welcome["payload"]["limits"]["rate_limit_bytes"] == 1024
    # Three messages of 600 bytes: the first fits the 1 KiB bucket.
    envs = [{"type": "event", "id": "arq_big%d" % i, "payload": {"pad": "x" * (600 - 60)}} for i in range(3)]
    burst(flood, envs)
    errors = [flood.recv_until(lambda e: e["type"] == "error")[0] for _ in range(2)]
    assert [e["correlation_id"] for e in errors] == ["arq_big1", "arq_big2"]
    for e in errors:
        assert error_code(e) == "rate_limited" and e["payload"]["limit"] == "rate_limit_bytes", e
        assert e["payload"]["max"] == 1024 and e["payload"]["retry_after_ms"] > 0, e
    pair.works()
    flood.close()


def test_rate_limit_close_after_going_on(make_server, pair_of):
    server = make_server(args=["--rate-limit-messages", "5", "--rate-limit-close-after", "10"])
    pair = pair_of(server)
    neighbour = Bus(server.port, timeout=TIMEOUT, channel="lab:close")  # same address, same channel
    flood = Bus(server.port, timeout=TIMEOUT, channel="lab:close")
    before = server.metrics()
    burst(flood, [{"type": "event", "id": "arq_f%d" % i, "payload": {}} for i in range(40)])
    messages, close, rest = drain_to_end(flood.ws, TIMEOUT)
    assert close is not None and parse_close(close) == (1008, b"rate limit exceeded"), (close, messages[-3:])
    errors = [check(p) for op, p in messages]
    assert all(error_code(e) == "rate_limited" for e in errors), errors
    # At most rate_limit_close_after answers: the refusals do not make the
    # client's queue grow with what it sends.
    assert len(errors) == 10, len(errors)
    assert denials(server, "rate_close") == 1
    key = 'arqonbus_connections_closed_total{reason="rate_limited"}'
    server.wait_metric(key, lambda v: v == before[key] + 1)
    assert "why=\"rate limit exceeded\"" in server.log() or "rate limit exceeded" in server.log()
    # The neighbour got the five events that passed, and keeps working.
    got = [neighbour.recv_until(lambda e: e["type"] == "event")[0]["id"] for _ in range(5)]
    assert got[0] == "arq_f0" and len(got) == 5
    neighbour.send({"type": "event", "id": "arq_n1", "payload": {}})
    reply = neighbour.command("ping")
    assert reply["command"] == "pong"
    pair.works()
    neighbour.close()


def test_default_rate_limits_take_a_burst_of_a_thousand(make_server):
    server = make_server()
    pub = Bus(server.port, timeout=TIMEOUT, channel="lab:burst")
    sub = Bus(server.port, timeout=TIMEOUT, channel="lab:burst")
    burst(pub, [{"type": "event", "id": "arq_b%d" % i, "payload": {"i": i}} for i in range(1000)])
    got = [sub.recv_until(lambda e: e["type"] == "event")[0]["payload"]["i"] for _ in range(1000)]
    assert got == list(range(1000))
    assert pub.command("ping")["command"] == "pong"
    assert [e for e in pub.skipped if e["type"] == "error"] == []
    assert denials(server, "rate") == 0


# ---- subscriptions, channels, rooms ---------------------------------------------------

def join(bus, channel):
    room, ch = channel.split(":")
    return bus.command("join_channel", {"room": room, "channel": ch})


def test_max_subscriptions(make_server, pair_of):
    server = make_server(args=["--max-subscriptions", "2"])
    pair = pair_of(server)
    b = Bus(server.port, timeout=TIMEOUT, channel="lab:one")
    assert b.welcome["payload"]["limits"]["max_subscriptions"] == 2
    assert join(b, "lab:two")["type"] == "system"
    r = join(b, "lab:three")
    assert error_code(r) == "limit_exceeded", r
    p = r["payload"]
    assert (p["limit"], p["max"], p["room"], p["channel"]) == ("max_subscriptions", 2, "lab", "three"), r
    assert r["command"] == "join_channel"
    # Joining a channel it has is no new subscription.
    assert join(b, "lab:two")["payload"]["joined"] is False
    # The refusal did not create the channel; leaving makes room.
    assert error_code(b.command("channel_info", {"room": "lab", "channel": "three"})) == "not_found"
    assert b.command("leave_channel", {"room": "lab", "channel": "one"})["type"] == "system"
    assert join(b, "lab:three")["payload"]["joined"] is True
    assert denials(server, "subscriptions") == 1
    pair.works()
    b.close()


def test_max_channels(make_server, pair_of):
    server = make_server(args=["--max-channels", str(BOOTSTRAP_CHANNELS + 1)])
    pair = pair_of(server)
    b = Bus(server.port, timeout=TIMEOUT)
    assert b.command("create_channel", {"room": "lab", "channel": "one"})["type"] == "system"
    # Everything that would create one more is refused, the channel not made.
    r = b.command("create_channel", {"room": "lab", "channel": "two"})
    assert error_code(r) == "limit_exceeded" and r["payload"]["limit"] == "max_channels", r
    assert r["payload"]["max"] == BOOTSTRAP_CHANNELS + 1
    r = join(b, "lab:two")
    assert error_code(r) == "limit_exceeded" and r["payload"]["limit"] == "max_channels", r
    b.send({"type": "event", "id": "arq_ev1", "room": "lab", "channel": "two", "payload": {}})
    r, _ = b.recv_until(lambda e: e["type"] == "error")
    assert (error_code(r), r["correlation_id"]) == ("limit_exceeded", "arq_ev1"), r
    # An initial channel that does not fit: the client is connected without
    # it, and told why right after the welcome.
    c = Bus(server.port, timeout=TIMEOUT, channel="lab:three")
    assert c.welcome["payload"]["subscriptions"] == [], c.welcome
    r = c.recv()
    assert error_code(r) == "limit_exceeded" and (r["payload"]["room"], r["payload"]["channel"]) == ("lab", "three")
    assert "correlation_id" not in r
    # Existing channels take joins and events as before.
    assert join(c, "lab:one")["payload"]["joined"] is True
    assert b.command("list_channels")["payload"]["count"] == BOOTSTRAP_CHANNELS + 1
    assert denials(server, "channels") == 4
    pair.works()
    for x in (b, c):
        x.close()


def test_max_rooms(make_server, pair_of):
    server = make_server(args=["--max-rooms", "3"])  # science, integriguard and one more
    pair = pair_of(server)
    b = Bus(server.port, timeout=TIMEOUT)
    assert join(b, "lab:one")["type"] == "system"
    r = join(b, "other:x")
    assert error_code(r) == "limit_exceeded", r
    assert (r["payload"]["limit"], r["payload"]["max"]) == ("max_rooms", 3), r
    assert join(b, "lab:two")["type"] == "system"  # a new channel in an existing room
    assert denials(server, "rooms") == 1
    pair.works()
    b.close()


@pytest.mark.parametrize("args", [["--max-channels", str(BOOTSTRAP_CHANNELS - 1)], ["--max-rooms", "1"]])
def test_fixed_channels_must_fit(args):
    r = run_bin(args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("arqonbus: config: the bootstrap, telemetry and dashboard channels (9 channels in 2 "
                               "rooms) do not fit"), r.stderr


# ---- the limits that were there before --------------------------------------------

def test_max_message_size_closes_with_1009(make_server, pair_of):
    server = make_server(args=["--max-message-size", "1KiB"])
    pair = pair_of(server)
    big = RawWS(server.port, timeout=TIMEOUT)
    big.recv_message()  # the welcome
    big.send_frame(OP_TEXT, b"x" * 1025)
    messages, close, _ = drain_to_end(big, TIMEOUT)
    assert parse_close(close) == (1009, b"message over the size limit"), close
    pair.works()


def test_max_envelope_size_answers_payload_too_large(make_server, pair_of):
    server = make_server(args=["--max-envelope-size", "1KiB"])
    pair = pair_of(server)
    b = Bus(server.port, timeout=TIMEOUT, channel=CHANNEL)
    b.send({"type": "event", "id": "arq_big", "payload": {"pad": "x" * 2000}})
    r, _ = b.recv_until(lambda e: e["type"] == "error")
    assert error_code(r) == "payload_too_large", r
    pair.works()
    # The connection stays open.
    assert b.command("ping")["command"] == "pong"
    b.close()


def test_max_malformed_closes_with_1008(make_server, pair_of):
    server = make_server(args=["--max-malformed", "3"])
    pair = pair_of(server)
    bad = RawWS(server.port, timeout=TIMEOUT)
    bad.recv_message()  # the welcome
    bad.send(b"".join(frame(OP_TEXT, b"not json") for _ in range(3)))
    messages, close, _ = drain_to_end(bad, TIMEOUT)
    assert [error_code(check(p)) for op, p in messages] == ["invalid_json"] * 3
    assert parse_close(close) == (1008, b"too many malformed messages"), close
    pair.works()


def test_max_header_size_refuses_with_431(make_server, pair_of):
    server = make_server(args=["--max-header-size", "1KiB"])
    pair = pair_of(server)
    refused(server.port, 431, "", extra="X-Pad: %s\r\n" % ("p" * 2000))
    pair.works()


def test_slow_consumer_is_closed_while_others_keep_up(make_server, pair_of):
    server = make_server(args=["--max-outbound-queue", "64KiB", "--write-timeout", "60s",
                               "--rate-limit-bytes", "1GiB"])
    pair = pair_of(server)
    slow = connect_many(server.port, 1, timeout=TIMEOUT, rcvbuf=4096, path=query(channel="lab:slow"))[0]
    reader = Bus(server.port, timeout=TIMEOUT, channel="lab:slow")
    pub = Bus(server.port, timeout=TIMEOUT)
    key = 'arqonbus_connections_closed_total{reason="slow_consumer"}'
    deadline = time.monotonic() + 10 * TIMEOUT
    rounds = 0
    # The reader reads everything in step with the publisher; the slow client
    # reads nothing, until its queue is over the bound.
    while rounds % 10 or server.metrics()[key] == 0:
        assert time.monotonic() < deadline, "the slow consumer was never closed"
        for i in range(4):
            pub.send({"type": "event", "room": "lab", "channel": "slow", "id": "arq_s%d_%d" % (rounds, i),
                      "payload": {"pad": "x" * 12000}})
        for i in range(4):
            env, _ = reader.recv_until(lambda e: e["type"] == "event")
            assert env["id"] == "arq_s%d_%d" % (rounds, i), env
        rounds += 1
    slow.close()
    pair.works()
    pub.send({"type": "event", "room": "lab", "channel": "slow", "id": "arq_after", "payload": {}})
    assert reader.recv_until(lambda e: e["type"] == "event")[0]["id"] == "arq_after"


# ---- one address, one client: their share of what everybody needs ---------------------


def test_one_address_cannot_hold_every_handshake_slot(make_server, pair_of):
    # max_connections 40: the shared bound on handshakes is 40 / 4 + 64 = 74.
    server = make_server(args=["--max-connections", "40", "--max-handshakes-per-ip", "8"])
    pair = pair_of(server)
    idle = []
    try:
        for _ in range(100):  # silent connections from 127.0.0.1, far over 8
            s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            idle.append(s)
        # Past the 8th, each is closed at once by the server.
        server.wait_metric('arqonbus_limit_denials_total{limit="handshakes_per_ip"}', lambda v: v >= 92)
        # Another address still gets in, and the ops port answers.
        other = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT, source_address=("127.0.0.2", 0))
        req, key = upgrade_request()
        other.sendall(req)
        assert other.recv(12) == b"HTTP/1.1 101"
        other.close()
        assert server.http("/health")[0] == 200
        pair.works()
    finally:
        for s in idle:
            s.close()


def test_one_client_cannot_fill_the_node_with_its_own_channels(make_server, pair_of):
    server = make_server(args=["--max-channels-per-client", "5"])
    pair = pair_of(server)
    a = Bus(server.port, timeout=TIMEOUT)
    # Join and leave: the emptied channels live on (channel_ttl) and count.
    for k in range(5):
        assert join(a, "mine:c%d" % k)["type"] == "system"
        assert a.command("leave_channel", {"room": "mine", "channel": "c%d" % k})["type"] == "system"
    r = join(a, "mine:c5")
    assert error_code(r) == "limit_exceeded", r
    assert (r["payload"]["limit"], r["payload"]["max"]) == ("max_channels_per_client", 5), r
    a.send({"type": "event", "id": "arq_new", "room": "mine", "channel": "c6", "payload": {}})
    r = a.recv()
    assert error_code(r) == "limit_exceeded" and r["correlation_id"] == "arq_new", r
    # Channels that exist may still be joined; one another client joined is
    # no longer only its own, which makes room.
    assert join(a, CHANNEL)["type"] == "system"
    b = Bus(server.port, timeout=TIMEOUT)
    assert join(b, "mine:c0")["type"] == "system"
    assert join(a, "mine:c5")["type"] == "system"
    # Another client creates channels of its own.
    assert join(b, "theirs:x")["type"] == "system"
    assert denials(server, "channels_created") == 2
    pair.works()
