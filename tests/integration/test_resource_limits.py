"""Regression tests for four resource-limit defects.

1. Pongs count against the outbound queue bound: a bus client that sends
   pings and never reads is closed as a slow consumer (1008 slow_consumer)
   instead of making the server queue pongs without limit.
2. The slow_consumer telemetry event reports the bytes that were queued when
   the client was closed (queued_bytes > 0), not what was left after the
   queue was dropped.
3. arqonbus_connections_closed_total{reason="handshake_failed"} and
   {reason="handshake_timeout"} count refused and timed-out upgrades on the
   bus and telemetry ports; ops-port requests are not counted there.
4. A history reply (the history command and GET /history) holds at most
   max_message_size bytes of messages, at least one: without `since` the
   newest that fit, with `since` the oldest that fit after it, with
   `more: true`; paging by `position` goes on without gaps or repeats.

Every envelope received goes through envelopes.check() (Bus.recv does it;
messages inside history replies, and whatever a raw socket read, are checked
here). Times are liveness bounds only (scaled by SLOW under ASan).
"""
import json
import socket
import time
import urllib.parse

from conftest import SLOW
from envelopes import Bus, check
from rawws import OP_CLOSE, OP_PING, OP_TEXT, RawWS, close_payload, parse_close, upgrade_request
from wsutil import closed_by_reason, connect_many, drain_to_end, masked_frame

TIMEOUT = 5.0 * SLOW
SLOW_CLOSES = "arqonbus_slow_consumer_closes_total"
CLOSED_SLOW = 'arqonbus_connections_closed_total{reason="slow_consumer"}'
RSS = "arqonbus_process_resident_memory_bytes"


def pong_of(bus):
    """Sends a ping command on 'bus' and checks that the pong reply arrives."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply


def check_raw_messages(messages):
    """Every data message a raw socket read is a text envelope."""
    for op, payload in messages:
        assert op == OP_TEXT, (op, payload[:200])
        check(payload)


# ---- 1. pongs count against the outbound queue bound --------------------------

def test_pinging_client_that_never_reads_is_closed_as_slow_consumer(make_server):
    server = make_server(args=["--max-outbound-queue", "64KiB", "--write-timeout", "60s",
                               "--close-timeout", "1s"])
    healthy = Bus(server.port, timeout=TIMEOUT)
    pinger = connect_many(server.port, 1, timeout=TIMEOUT, rcvbuf=4096)[0]
    before = server.metrics()
    # 8,000 pings of 125 bytes (131 bytes each on the wire, about 1 MB) per
    # chunk, at most 100 chunks: about 100 MB of pings, whose pongs the
    # server would queue if they did not count against the bound.
    one = masked_frame(OP_PING, b"p" * 125)
    chunk = one * 8000
    sent, closed, send_failed = 0, False, False
    pinger.sock.settimeout(0.5 * SLOW)
    for _ in range(100):
        try:
            pinger.sock.sendall(chunk)
            sent += len(chunk)
        except (socket.timeout, OSError):
            # The server stopped reading (it sent its close) or dropped the
            # connection: what it had queued is no longer growing.
            send_failed = True
        pong_of(healthy)
        if server.metrics()[SLOW_CLOSES] > before[SLOW_CLOSES]:
            closed = True
            break
        if send_failed:
            break
    if not closed:
        server.wait_metric(SLOW_CLOSES, lambda v: v > before[SLOW_CLOSES])
    mid = server.metrics()
    assert mid[RSS] < 200e6, "resident memory %.0f MB after %d MB of pings" % (mid[RSS] / 1e6, sent // 1000000)
    pong_of(healthy)

    # Reading now: the welcome, any pongs written before the close, then the
    # close frame 1008 slow_consumer (or the connection was already dropped).
    messages, close, _ = drain_to_end(pinger, 10 * SLOW)
    check_raw_messages(messages)
    assert len(messages) <= 1, messages
    if messages:
        assert json.loads(messages[0][1])["payload"]["event"] == "welcome"
    if close is not None:
        assert parse_close(close) == (1008, b"slow_consumer"), close
    pinger.close()

    server.wait_metric("arqonbus_connections", lambda v: v == 1)
    pong_of(healthy)
    after = server.metrics()
    assert after[SLOW_CLOSES] == before[SLOW_CLOSES] + 1
    assert after[CLOSED_SLOW] == before[CLOSED_SLOW] + 1
    assert after[RSS] < 200e6, after[RSS]
    assert "slow consumer closed" in server.log()
    healthy.close()


def test_monitoring_client_pinging_without_reading_is_bounded_not_closed(make_server):
    """On the telemetry port the same bound (telemetry_queue) holds for pongs,
    but a monitoring client is never disconnected: pongs beyond the bound
    are simply not queued, so ~60 MB of pings leave the server small."""
    server = make_server(args=["--telemetry-queue", "64KiB", "--write-timeout", "60s"])
    healthy = Bus(server.port, timeout=TIMEOUT)
    ws = RawWS(server.telemetry_port, timeout=TIMEOUT)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = masked_frame(OP_PING, b"p" * 125) * 8000
    sent = 0
    base = server.metrics()[RSS]
    ws.sock.settimeout(2 * SLOW)
    for _ in range(60):
        try:
            ws.sock.sendall(chunk)
        except socket.timeout:
            break  # the server stopped reading: nothing more can pile up
        sent += len(chunk)
        pong_of(healthy)
    m = server.metrics()
    assert sent >= 30e6, "the server stopped reading pings after %d bytes" % sent
    # Queued pongs would be about as large as the pings sent.
    assert m[RSS] - base < 20e6, "resident memory grew %.0f MB with %d MB of pings" % (
        (m[RSS] - base) / 1e6, sent // 1000000)
    assert m["arqonbus_telemetry_clients"] == 1  # still connected
    assert m[SLOW_CLOSES] == 0
    pong_of(healthy)
    ws.close()
    healthy.close()


def test_pings_that_are_read_are_all_answered(make_server):
    """The bound is about what is queued: a client that reads its pongs may
    ping as much as it likes (far more than the 64 KiB bound in total)."""
    server = make_server(args=["--max-outbound-queue", "64KiB"])
    ws = RawWS(server.port, timeout=TIMEOUT)
    welcome = ws.recv_message()
    assert welcome[0] == OP_TEXT and check(welcome[1])["payload"]["event"] == "welcome"
    before = server.metrics()[SLOW_CLOSES]
    one = masked_frame(OP_PING, b"q" * 125)
    for _ in range(20):
        ws.send(one * 200)  # 200 pongs (25 KB) at a time, read before sending more
        for _ in range(200):
            fin, op, payload = ws.recv_frame()
            assert (fin, op, payload) == (True, 0xA, b"q" * 125), (op, payload[:50])
    assert server.metrics()[SLOW_CLOSES] == before
    ws.close()


# ---- 2. the slow_consumer event reports the bytes queued -----------------------

def test_slow_consumer_event_reports_queued_bytes(make_server):
    server = make_server(args=["--max-outbound-queue", "64KiB", "--write-timeout", "60s",
                               "--close-timeout", "1s"])
    mon = RawWS(server.telemetry_port, timeout=TIMEOUT, path="/?events=slow_consumer")
    op, payload = mon.recv_message()
    assert op == OP_TEXT
    welcome = check(payload)
    assert welcome["type"] == "system" and welcome["payload"]["event"] == "welcome", welcome
    assert welcome["payload"]["events"] == ["slow_consumer"], welcome

    slow = connect_many(server.port, 1, timeout=TIMEOUT, rcvbuf=4096, path="/?channel=lab:slow")[0]
    op, payload = slow.recv_message()  # the welcome (small): then it never reads again
    assert op == OP_TEXT
    slow_welcome = check(payload)
    slow_id = slow_welcome["payload"]["client_id"]
    assert slow_welcome["payload"]["subscriptions"] == ["lab:slow"], slow_welcome

    pub = Bus(server.port, timeout=TIMEOUT)
    before = server.metrics()[SLOW_CLOSES]
    body = {"type": "event", "room": "lab", "channel": "slow", "payload": {"pad": "x" * 12000}}
    env = None
    mon.sock.settimeout(0.05)
    for _ in range(200):  # at most 200 * 10 * 12 KB = 24 MB
        for _ in range(10):
            pub.send(body)
        try:
            op, payload = mon.recv_message()
        except socket.timeout:
            continue
        assert op == OP_TEXT
        env = check(payload)
        break
    assert env is not None, "no slow_consumer event:\n" + server.log()[-2000:]
    assert env["type"] == "telemetry" and env["eventType"] == "slow_consumer", env
    p = env["payload"]
    assert p["client_id"] == slow_id and p["port"] == "bus", p
    assert isinstance(p["queued_bytes"], int) and p["queued_bytes"] > 0, p
    # It was closed because one more event (about 12.1 KB as delivered) would
    # have taken its queue over the 64 KiB bound: what was queued then, the
    # part being written included, is within one event of the bound.
    assert 65536 - 13000 < p["queued_bytes"] <= 65536, p
    # The log line says the same.
    assert "queued_bytes=%d" % p["queued_bytes"] in server.log(), server.log()[-2000:]
    assert server.metrics()[SLOW_CLOSES] == before + 1
    pong_of(pub)

    # Nothing else reaches the monitor (one close, one event).
    mon.sock.settimeout(0.3)
    try:
        op, payload = mon.recv_message()
        raise AssertionError("a second event: %r" % payload[:300])
    except socket.timeout:
        pass
    slow.close()
    pub.close()
    mon.close()


# ---- 3. refused and timed-out upgrades are counted as closed connections ----------

def exchange(port, data, timeout):
    """Sends 'data' on a fresh connection and reads until the server closes
    it. Returns the HTTP status of the answer, or None when there was none."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        raw = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
    if not raw:
        return None
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    return int(raw.split()[1])


def handshake_errors(metrics):
    prefix = 'arqonbus_handshake_errors_total{status="'
    return {k[len(prefix):-2]: v for k, v in metrics.items() if k.startswith(prefix)}


def deltas(before, after):
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_refused_and_timed_out_upgrades_are_counted(make_server):
    server = make_server(args=["--handshake-timeout", "500ms"])
    before = server.metrics()
    no_upgrade = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    post, _ = upgrade_request()
    post = post.replace(b"GET ", b"POST ", 1)
    v8, _ = upgrade_request(version="8")
    bad_events, _ = upgrade_request(path="/?events=no_such_kind")
    # Bus port: 400, 405, 426; telemetry port: 400 (no upgrade), 400 (an
    # unknown event kind).
    assert exchange(server.port, no_upgrade, TIMEOUT) == 400
    assert exchange(server.port, post, TIMEOUT) == 405
    assert exchange(server.port, v8, TIMEOUT) == 426
    assert exchange(server.telemetry_port, no_upgrade, TIMEOUT) == 400
    assert exchange(server.telemetry_port, bad_events, TIMEOUT) == 400
    # Ops port: good and bad requests, none of them an upgrade.
    for path in ("/health", "/version", "/nope", "/history"):
        server.http(path)
    assert exchange(server.http_port, b"garbage\r\n\r\n", TIMEOUT) == 400
    assert exchange(server.http_port, b"POST /health HTTP/1.1\r\nHost: x\r\n\r\n", TIMEOUT) == 405
    mid = server.metrics()
    closed = deltas(closed_by_reason(before), closed_by_reason(mid))
    assert closed == {"handshake_failed": 5}, closed
    assert deltas(handshake_errors(before), handshake_errors(mid)) == {"400": 3, "405": 1, "426": 1}

    # Silent connections: one on each WebSocket port times out (408).
    start = time.monotonic()
    for port in (server.port, server.telemetry_port):
        status = exchange(port, b"", 0.5 + 3 * SLOW)
        assert status in (408, None), status
    assert time.monotonic() - start < 2 * (0.5 + 3 * SLOW)
    after = server.metrics()
    closed = deltas(closed_by_reason(mid), closed_by_reason(after))
    assert closed == {"handshake_timeout": 2}, closed
    # A good connection still works, and its end is counted as normal.
    bus = Bus(server.port, timeout=TIMEOUT)
    pong_of(bus)
    bus.ws.send_frame(OP_CLOSE, close_payload(1000))
    code, _ = bus.expect_close()
    assert code == 1000
    bus.close()
    server.wait_metric('arqonbus_connections_closed_total{reason="normal"}',
                       lambda v: v == after.get('arqonbus_connections_closed_total{reason="normal"}', 0) + 1)
    final = server.metrics()
    assert deltas(closed_by_reason(after), closed_by_reason(final)) == {"normal": 1}
    assert final["arqonbus_connections_opened_total"] == before["arqonbus_connections_opened_total"] + 1


def test_silent_ops_connection_is_not_a_handshake_timeout(make_server):
    server = make_server(args=["--handshake-timeout", "500ms"])
    before = server.metrics()
    # A silent ops connection, kept open past the handshake timeout (whether
    # the ops port drops it or not, it is not a WebSocket handshake).
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=1.0 + SLOW) as s:
        try:
            s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            pass
    # A half request too.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=1.0 + SLOW) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        try:
            while s.recv(65536):
                pass
        except (socket.timeout, ConnectionResetError):
            pass
    time.sleep(0.2)
    after = server.metrics()
    assert deltas(closed_by_reason(before), closed_by_reason(after)) == {}
    assert after["arqonbus_connections_opened_total"] == before["arqonbus_connections_opened_total"]


# ---- 4. a history reply holds at most max_message_size bytes ------------------

LIMIT = 65536


def history(bus, room, channel, **payload):
    r = bus.command("history", {"room": room, "channel": channel}, **payload)
    assert r["type"] == "system" and r["command"] == "history", r
    p = r["payload"]
    assert (p["room"], p["channel"]) == (room, channel), p
    assert p["count"] == len(p["messages"]), p
    for m in p["messages"]:
        check(m)
    return p


def ops_history(server, **params):
    status, headers, body = server.http("/history?" + urllib.parse.urlencode(params))
    assert status == 200, body[:300]
    p = json.loads(body)
    for m in p["messages"]:
        check(m)
    return p


def test_history_reply_is_bounded_by_max_message_size(make_server):
    server = make_server(args=["--max-message-size", "64KiB", "--max-envelope-size", "64KiB"])
    pub = Bus(server.port, timeout=TIMEOUT)
    sub = Bus(server.port, timeout=TIMEOUT, channel="lab:big")
    other = Bus(server.port, timeout=TIMEOUT)
    ids = ["arq_big%d" % i for i in range(10)]
    for i, mid in enumerate(ids):
        pub.send({"type": "event", "id": mid, "room": "lab", "channel": "big",
                  "payload": {"i": i, "pad": chr(ord("a") + i) * 20000}})
    # The subscriber sees each as delivered: its exact size on the wire.
    size, position = {}, {}
    for mid in ids:
        sub.ws.sock.settimeout(TIMEOUT)
        op, raw = sub.ws.recv_message()
        assert op == OP_TEXT
        env = check(raw)
        assert env["id"] == mid, env
        assert isinstance(env["position"], str), env
        size[mid], position[mid] = len(raw), env["position"]
    assert all(20000 < n < 21000 for n in size.values()), size
    positions = [int(position[m]) for m in ids]
    assert positions == sorted(set(positions)), positions

    def fitting(seq, newest):
        """The longest run of 'seq' (from its end when 'newest') within LIMIT bytes, at least one."""
        out, total = [], 0
        for m in (reversed(seq) if newest else seq):
            if out and total + size[m] > LIMIT:
                break
            out.append(m)
            total += size[m]
        return list(reversed(out)) if newest else out

    def got(p):
        msgs = [m["id"] for m in p["messages"]]
        assert sum(size[m] for m in msgs) <= LIMIT or len(msgs) == 1, p["count"]
        assert sum(len(json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()) for m in p["messages"]) \
            <= LIMIT
        for m in p["messages"]:
            assert m["position"] == position[m["id"]], m["id"]
        return msgs

    # No since: the newest that fit, oldest first, and more older ones.
    t0 = time.monotonic()
    p = history(pub, "lab", "big")
    newest = fitting(ids, newest=True)
    assert 1 <= len(newest) < 10
    assert got(p) == newest and p["more"] is True and p["limit"] == 50, (got(p), p["more"])
    assert "since" not in p and "gap" not in p
    assert ops_history(server, room="lab", channel="big") == p

    # A ping from another client is answered promptly meanwhile.
    pong_of(other)
    assert time.monotonic() - t0 < TIMEOUT

    # since the first: starts right after it, the oldest that fit, more: true.
    p = history(pub, "lab", "big", since=position[ids[0]])
    first_page = fitting(ids[1:], newest=False)
    assert got(p) == first_page and p["more"] is True and p["gap"] is False, (got(p), p["more"], p["gap"])
    assert p["since"] == position[ids[0]]
    assert ops_history(server, room="lab", channel="big", since=position[ids[0]]) == p

    # Paging from the last position returned: no gaps, no repeats, until more is false.
    seen = list(first_page)
    for _ in range(10):
        if not p["more"]:
            break
        last = p["messages"][-1]["position"]
        p = history(pub, "lab", "big", since=last)
        assert ops_history(server, channel="lab:big", since=last) == p
        page = got(p)
        assert page, p
        assert page == fitting(ids[ids.index(seen[-1]) + 1:], newest=False)
        assert p["gap"] is False
        seen += page
        pong_of(other)
    assert p["more"] is False
    assert seen == ids[1:]

    # A smaller limit still applies; since "0" starts with the oldest.
    p = history(pub, "lab", "big", limit=2)
    assert got(p) == ids[8:] and p["more"] is True
    p = history(pub, "lab", "big", since="0")
    assert got(p) == fitting(ids, newest=False) and p["more"] is True
    for c in (pub, sub, other):
        c.close()
