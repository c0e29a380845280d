"""GET /metrics: the Prometheus exposition of the observability issue.

What a monitoring system observes: the exact metric names of the issue
(arqonbus_connections, arqonbus_messages_received_total{type},
arqonbus_messages_delivered_total{type}, the arqonbus_routing_latency_seconds
histogram and the others of src/obs/metrics.c) with their HELP and TYPE; an
exposition that `promtool check metrics` accepts; counters that move by
exactly the traffic a test sends (messages by type, errors by code, routing
latency and command duration observations, history, telemetry events, bytes
in and out, connections); and a real Prometheus that scrapes the ops port,
sees the target up and reads arqonbus_connections as it is.

Every envelope received goes through envelopes.check() (Bus.recv does it).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from busprobe import counted_bus
from conftest import SLOW, free_port, wait_port
import envelopes
from envelopes import Bus, check, error_code
from rawws import OP_TEXT, RawWS, close_payload, frame, upgrade_request
from wsutil import reset

PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"
TIMEOUT = 5.0 * SLOW
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MSG_TYPES = ["event", "system", "command", "private", "telemetry", "error"]
ERROR_CODES = ["invalid_json", "invalid_envelope", "unsupported_version", "unknown_type", "unsupported_frame",
               "payload_too_large", "unknown_command", "invalid_argument", "not_found", "already_exists", "forbidden",
               "internal_error", "storage_unavailable", "unauthorized", "rate_limited", "limit_exceeded"]
COMMANDS = ["status", "create_channel", "delete_channel", "join_channel", "leave_channel", "list_channels",
            "channel_info", "ping", "history", "help", "authenticate"]

# Every family the issue and src/obs/metrics.c name: type and label names.
FAMILIES = {
    "arqonbus_connections": ("gauge", set()),
    "arqonbus_connections_opened_total": ("counter", set()),
    "arqonbus_connections_closed_total": ("counter", {"reason"}),
    "arqonbus_protocol_errors_total": ("counter", {"code"}),
    "arqonbus_handshake_errors_total": ("counter", {"status"}),
    "arqonbus_auth_total": ("counter", {"result"}),
    "arqonbus_auth_reloads_total": ("counter", {"result"}),
    "arqonbus_forbidden_total": ("counter", {"action"}),
    "arqonbus_slow_consumer_closes_total": ("counter", set()),
    "arqonbus_messages_received_total": ("counter", {"type"}),
    "arqonbus_messages_delivered_total": ("counter", {"type"}),
    "arqonbus_errors_total": ("counter", {"code"}),
    "arqonbus_malformed_closes_total": ("counter", set()),
    "arqonbus_limit_denials_total": ("counter", {"limit"}),
    "arqonbus_routing_latency_seconds": ("histogram", set()),
    "arqonbus_command_duration_seconds": ("histogram", {"command"}),
    "arqonbus_clients": ("gauge", set()),
    "arqonbus_rooms": ("gauge", set()),
    "arqonbus_channels": ("gauge", set()),
    "arqonbus_history_messages": ("gauge", set()),
    "arqonbus_storage_up": ("gauge", {"backend"}),
    "arqonbus_telemetry_clients": ("gauge", set()),
    "arqonbus_telemetry_events_total": ("counter", set()),
    "arqonbus_telemetry_dropped_total": ("counter", set()),
    "arqonbus_received_bytes_total": ("counter", set()),
    "arqonbus_sent_bytes_total": ("counter", set()),
    "arqonbus_http_requests_total": ("counter", set()),
    "arqonbus_start_time_seconds": ("gauge", set()),
    "arqonbus_process_resident_memory_bytes": ("gauge", set()),
    "arqonbus_process_open_fds": ("gauge", set()),
    "arqonbus_process_max_fds": ("gauge", set()),
}

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

def close_of(ws):
    return envelopes.close_of(ws, TIMEOUT)


def parse_exposition(text):
    """{family: {"type", "help", "samples": [(name, {label: value}, float)]}}.
    Checks the text format's rules that a scraper relies on: HELP and TYPE
    once per family, before its samples; samples of a family together; no
    series twice."""
    fams, order, seen = {}, [], set()
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, name, rest = line[2:6], line.split(" ")[2], line.split(" ", 3)[3]
            fam = fams.setdefault(name, {"samples": []})
            assert kind.lower() not in fam, "second %s line for %s" % (kind, name)
            assert not fam["samples"], "%s of %s after its samples" % (kind, name)
            fam[kind.lower()] = rest
            if name not in order:
                order.append(name)
            current = name
            continue
        assert line and not line.startswith("#"), "unexpected line %r" % line
        m = SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        name, labels, value = m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))
        assert current and (name == current or name in (current + "_bucket", current + "_sum", current + "_count")), \
            "sample %s outside its family (current %s)" % (name, current)
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, "series twice: %r" % (key,)
        seen.add(key)
        fams[current]["samples"].append((name, labels, value))
    return fams


def get_metrics_text(server):
    status, headers, body = server.http("/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    return body.decode()


def delta(after, before, key):
    return after.get(key, 0) - before.get(key, 0)


def family_deltas(after, before, prefix):
    """{series key: after - before} for every series whose key starts with 'prefix'."""
    keys = {k for k in after if k.startswith(prefix)} | {k for k in before if k.startswith(prefix)}
    return {k: delta(after, before, k) for k in keys}


def check_histogram(samples, labels=None):
    """Cumulative buckets with ascending bounds ending at +Inf == _count."""
    labels = labels or {}

    def mine(l):
        return all(l.get(k) == v for k, v in labels.items())
    buckets = [(l["le"], v) for n, l, v in samples if n.endswith("_bucket") and mine(l)]
    count = [v for n, l, v in samples if n.endswith("_count") and mine(l)]
    total = [v for n, l, v in samples if n.endswith("_sum") and mine(l)]
    assert buckets and len(count) == 1 and len(total) == 1, (labels, samples[:5])
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf"), bounds
    values = [v for _, v in buckets]
    assert values == sorted(values), values
    assert values[-1] == count[0] and total[0] >= 0
    return count[0], total[0], dict(zip(bounds, values))


class Monitor:
    """A minimal monitoring client on the telemetry port."""

    def __init__(self, server, events=None):
        self.ws = RawWS(server.telemetry_port, timeout=TIMEOUT, path="/?events=" + ",".join(events) if events else "/")
        w = self.read(TIMEOUT)
        assert w["type"] == "system" and w["payload"]["event"] == "welcome", w

    def read(self, timeout):
        self.ws.sock.settimeout(timeout)
        op, payload = self.ws.recv_message()
        assert op == OP_TEXT
        return check(payload)

    def drain(self, quiet=0.3):
        out = []
        try:
            while True:
                env = self.read(quiet)
                assert env["type"] == "telemetry", env
                out.append(env)
        except socket.timeout:
            return out

    def close(self):
        self.ws.close()


# ---- the exposition ----------------------------------------------------------

def some_traffic(server):
    """Traffic that gives most label values a non-zero count."""
    mon = Monitor(server)
    a = Bus(server.port, client_id="t-a", client_type="ai-agent", channel="lab:p")
    b = Bus(server.port, client_id="t-b", channel="lab:p")
    a.recv()  # b joined
    a.send({"type": "event", "payload": {"x": 1}})
    a.send({"type": "private", "to": ["t-b"], "payload": {}})
    a.send({"type": "telemetry", "eventType": "cpu", "payload": {"v": 1}})
    a.send("nope")
    for name in COMMANDS:
        a.command(name, {"room": "lab", "channel": "q" if "channel" in name else "p"})
    assert b.recv()["type"] == "event" and b.recv()["type"] == "private"
    raw = RawWS(server.port)
    raw.send(frame(0x1, b"x", mask=False))  # 1002
    close_of(raw)
    for c in (mon, a, b, raw):
        c.close()


def test_exposition_has_the_issue_families_and_promtool_accepts_it(server):
    some_traffic(server)
    text = get_metrics_text(server)
    fams = parse_exposition(text)
    for name, (kind, labels) in FAMILIES.items():
        assert name in fams, "no %s in /metrics" % name
        assert fams[name].get("type") == kind, (name, fams[name].get("type"))
        assert fams[name].get("help"), name
        assert fams[name]["samples"], name
        for _, l, _ in fams[name]["samples"]:
            assert set(l) - {"le"} == labels, (name, l)
    assert set(fams) == set(FAMILIES), set(fams) ^ set(FAMILIES)
    by = lambda fam, label: {l[label]: v for _, l, v in fams[fam]["samples"]}  # noqa: E731
    assert set(by("arqonbus_messages_received_total", "type")) == set(MSG_TYPES) | {"invalid"}
    assert set(by("arqonbus_messages_delivered_total", "type")) == set(MSG_TYPES)
    assert set(by("arqonbus_errors_total", "code")) == set(ERROR_CODES)
    assert set(by("arqonbus_storage_up", "backend")) == {"memory"}
    count, _, _ = check_histogram(fams["arqonbus_routing_latency_seconds"]["samples"])
    assert count >= 3  # the event, the private message, the telemetry
    for cmd in COMMANDS:
        n, _, _ = check_histogram(fams["arqonbus_command_duration_seconds"]["samples"], {"command": cmd})
        assert n == 1, cmd
    # promtool, the reference parser and linter.
    if not os.path.exists(PROMTOOL):
        pytest.fail("promtool is missing: apt-get install -y prometheus")
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        r.returncode, r.stdout.decode(), r.stderr.decode())


# ---- counters move by exactly the traffic -------------------------------------

def test_message_counters_move_by_exactly_the_traffic(server):
    a, a_sock, _ = counted_bus(server.port, timeout=TIMEOUT, client_id="pa")
    b, b_sock, _ = counted_bus(server.port, timeout=TIMEOUT, client_id="pb", channel="lab:m")
    c, c_sock, _ = counted_bus(server.port, timeout=TIMEOUT, client_id="pc", channel="lab:m")
    assert b.recv()["payload"]["event"] == "client_joined"
    socks = (a_sock, b_sock, c_sock)
    sent0, recv0 = a_sock.sent, sum(s.received for s in socks)
    m0 = server.metrics()

    for i in range(5):
        a.send({"type": "event", "room": "lab", "channel": "m", "payload": {"i": i}})
    for i in range(2):
        a.send({"type": "private", "to": ["pb", "pc"], "payload": {"i": i}})
    a.send({"type": "private", "id": "arq_ghost", "to": ["pb", "ghost"], "payload": {}})
    assert error_code(a.recv()) == "not_found"
    for _ in range(3):
        assert a.command("ping")["command"] == "pong"
    assert a.command("channel_info", {"room": "lab", "channel": "m"})["payload"]["members"] == 2
    assert error_code(a.command("nope")) == "unknown_command"
    for text in ("{", "[1]x"):
        a.send(text)
        assert error_code(a.recv()) == "invalid_json"
    a.send({"type": "system", "payload": {}})
    assert error_code(a.recv()) == "forbidden"
    a.send_binary(b"\x01")
    assert error_code(a.recv()) == "unsupported_frame"
    a.send({"type": "bogus"})
    assert error_code(a.recv()) == "unknown_type"
    a.send({"type": "telemetry", "eventType": "cpu", "payload": {"v": 2}})
    assert a.command("ping")["command"] == "pong" and a.skipped == []
    got_b = [b.recv()["type"] for _ in range(8)]
    got_c = [c.recv()["type"] for _ in range(7)]
    assert got_b == ["event"] * 5 + ["private"] * 3 and got_c == ["event"] * 5 + ["private"] * 2

    m1 = server.metrics()
    assert family_deltas(m1, m0, "arqonbus_messages_received_total{") == {
        'arqonbus_messages_received_total{type="%s"}' % t: n for t, n in
        (("event", 5), ("system", 1), ("command", 6), ("private", 3), ("telemetry", 1), ("error", 0),
         ("invalid", 4))}
    assert family_deltas(m1, m0, "arqonbus_messages_delivered_total{") == {
        'arqonbus_messages_delivered_total{type="%s"}' % t: n for t, n in
        (("event", 10), ("system", 5), ("command", 0), ("private", 5), ("telemetry", 0), ("error", 7))}
    errors = dict.fromkeys(ERROR_CODES, 0)
    errors.update(not_found=1, unknown_command=1, invalid_json=2, forbidden=1, unsupported_frame=1, unknown_type=1)
    assert family_deltas(m1, m0, "arqonbus_errors_total{") == {
        'arqonbus_errors_total{code="%s"}' % k: v for k, v in errors.items()}
    # One routing observation per event, private and telemetry message.
    assert delta(m1, m0, "arqonbus_routing_latency_seconds_count") == 9
    assert delta(m1, m0, 'arqonbus_routing_latency_seconds_bucket{le="+Inf"}') == 9
    assert delta(m1, m0, "arqonbus_routing_latency_seconds_sum") >= 0
    durations = {'arqonbus_command_duration_seconds_count{command="%s"}' % k: 0 for k in COMMANDS}
    durations.update({'arqonbus_command_duration_seconds_count{command="ping"}': 4,
                      'arqonbus_command_duration_seconds_count{command="channel_info"}': 1})
    assert family_deltas(m1, m0, "arqonbus_command_duration_seconds_count{") == durations
    # Five events in lab:m and the telemetry in the telemetry channel's history.
    assert delta(m1, m0, "arqonbus_history_messages") == 6
    # Bytes: what the clients wrote after m0, and what they read.
    assert delta(m1, m0, "arqonbus_received_bytes_total") == a_sock.sent - sent0
    assert delta(m1, m0, "arqonbus_sent_bytes_total") == sum(s.received for s in socks) - recv0
    # Nothing else moved; the /metrics request itself is counted.
    for key in ("arqonbus_connections", "arqonbus_connections_opened_total", "arqonbus_clients",
                "arqonbus_malformed_closes_total", "arqonbus_telemetry_events_total",
                "arqonbus_telemetry_dropped_total", "arqonbus_slow_consumer_closes_total"):
        assert delta(m1, m0, key) == 0, key
    assert delta(m1, m0, "arqonbus_http_requests_total") == 1
    for x in (a, b, c):
        x.close()


def test_connection_counters_and_gauges(server):
    m0 = server.metrics()
    buses = [Bus(server.port, timeout=TIMEOUT) for _ in range(3)]
    mons = [Monitor(server) for _ in range(2)]
    m1 = server.metrics()
    assert delta(m1, m0, "arqonbus_connections") == 5
    assert delta(m1, m0, "arqonbus_connections_opened_total") == 5
    assert delta(m1, m0, "arqonbus_clients") == 3
    assert delta(m1, m0, "arqonbus_telemetry_clients") == 2
    # A close handshake, a reset, and a refused telemetry upgrade.
    buses[0].ws.send_frame(0x8, close_payload(1000))
    assert close_of(buses[0].ws) == (1000, "")
    buses[0].close()
    reset(mons[0].ws.sock)
    ws = RawWS(server.telemetry_port, upgrade=False, timeout=TIMEOUT)
    ws.send(upgrade_request(path="/?events=nonsense")[0])
    assert ws.read_http_response()[0] == 400
    ws.close()
    server.wait_metric("arqonbus_connections", lambda v: v == m0["arqonbus_connections"] + 3)
    # The refused upgrade ends a connection too, counted once it is closed.
    failed = 'arqonbus_connections_closed_total{reason="handshake_failed"}'
    server.wait_metric(failed, lambda v: v == m0[failed] + 1)
    m2 = server.metrics()
    assert delta(m2, m0, "arqonbus_clients") == 2 and delta(m2, m0, "arqonbus_telemetry_clients") == 1
    assert delta(m2, m0, "arqonbus_connections_opened_total") == 5
    assert delta(m2, m0, 'arqonbus_connections_closed_total{reason="normal"}') == 1
    closed = family_deltas(m2, m0, "arqonbus_connections_closed_total{")
    assert sum(closed.values()) == 3 and closed[failed] == 1, closed
    assert closed['arqonbus_connections_closed_total{reason="peer_gone"}'] + \
        closed['arqonbus_connections_closed_total{reason="io_error"}'] == 1, closed
    assert family_deltas(m2, m0, "arqonbus_handshake_errors_total{") == {
        'arqonbus_handshake_errors_total{status="%s"}' % s: (1 if s == "400" else 0)
        for s in ("400", "401", "403", "405", "408", "426", "429", "431", "503")}
    for x in buses[1:] + mons[1:]:
        x.close()
    server.wait_metric("arqonbus_connections", lambda v: v == m0["arqonbus_connections"])
    assert server.metrics()["arqonbus_clients"] == m0["arqonbus_clients"]


def test_telemetry_events_total_counts_what_monitors_are_sent(make_server):
    server = make_server(args=["--telemetry-stats-interval", "0"])
    mon = Monitor(server)
    m0 = server.metrics()
    assert m0["arqonbus_telemetry_events_total"] == 0
    c = Bus(server.port, client_type="service", channel="lab:t")
    c.join("lab:u")
    c.send("garbage")
    assert error_code(c.recv()) == "invalid_json"
    c.close()
    got = mon.drain(0.3)
    kinds = {e["eventType"] for e in got}
    assert {"client_connected", "channel_created", "client_joined", "command_executed", "error",
            "client_disconnected", "client_left", "agent_activity"} <= kinds, kinds
    m1 = server.metrics()
    assert delta(m1, m0, "arqonbus_telemetry_events_total") == len(got)
    assert delta(m1, m0, "arqonbus_telemetry_dropped_total") == 0
    mon.close()
    # A monitor that wants only stats (none with interval 0): bus traffic
    # publishes nothing.
    only_stats = Monitor(server, events=["stats"])
    server.wait_metric("arqonbus_telemetry_clients", lambda v: v == 1)
    m2 = server.metrics()
    with Bus(server.port, timeout=TIMEOUT, client_type="ai-agent") as d:
        d.join("lab:v")
        d.send({"type": "telemetry", "eventType": "x", "payload": {}})
        assert d.command("ping")["command"] == "pong"
    assert only_stats.drain(0.2) == []
    assert delta(server.metrics(), m2, "arqonbus_telemetry_events_total") == 0
    only_stats.close()


# ---- a real Prometheus -------------------------------------------------------

def api(port, path, **params):
    url = "http://127.0.0.1:%d%s" % (port, path)
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_the_ops_port(server):
    if not os.path.exists(PROMETHEUS):
        pytest.fail("prometheus is missing: apt-get install -y prometheus")
    tmp = tempfile.mkdtemp(prefix="arqonbus-prom-")
    port = free_port()
    config = os.path.join(tmp, "prometheus.yml")
    with open(config, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: arqonbus\n    static_configs:\n"
                "      - targets: ['127.0.0.1:%d']\n" % server.http_port)
    buses = [Bus(server.port, timeout=TIMEOUT) for _ in range(3)]
    mon = Monitor(server)
    log = open(os.path.join(tmp, "prometheus.log"), "wb")
    proc = subprocess.Popen([PROMETHEUS, "--config.file=" + config, "--storage.tsdb.path=" + os.path.join(tmp, "data"),
                             "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        assert wait_port(port, 20), "prometheus did not listen"

        def poll(what, fn, timeout=20):
            deadline = time.monotonic() + timeout
            last = None
            while time.monotonic() < deadline:
                try:
                    last = fn()
                    if last is True:
                        return
                except (OSError, ValueError, KeyError, IndexError) as e:
                    last = e
                time.sleep(0.2)
            raise AssertionError("%s: last %r" % (what, last))

        def target_up():
            targets = api(port, "/api/v1/targets")["activeTargets"]
            if len(targets) != 1:
                return targets  # not discovered yet
            t = targets[0]
            assert t["scrapeUrl"] == "http://127.0.0.1:%d/metrics" % server.http_port, t
            return True if t["health"] == "up" and t["lastError"] == "" else t

        def value(query):
            result = api(port, "/api/v1/query", query=query)["result"]
            return result[0]["value"][1] if len(result) == 1 else result

        # The first scrape waits for target discovery (Prometheus sends its
        # first update after about 5 s).
        poll("target up", target_up)
        poll("up == 1", lambda: value('up{job="arqonbus"}') == "1" or value('up{job="arqonbus"}'))
        poll("arqonbus_connections == 4", lambda: value("arqonbus_connections") == "4" or value("arqonbus_connections"))
        buses.pop().close()
        poll("arqonbus_connections == 3", lambda: value("arqonbus_connections") == "3" or value("arqonbus_connections"))
        # The histogram and the labelled counters are series Prometheus knows.
        got = api(port, "/api/v1/query", query="arqonbus_messages_received_total")["result"]
        assert {r["metric"]["type"] for r in got} == set(MSG_TYPES) | {"invalid"}, got
        got = api(port, "/api/v1/query", query="arqonbus_routing_latency_seconds_bucket")["result"]
        assert {r["metric"]["le"] for r in got} >= {"+Inf"}, got
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for x in buses + [mon]:
            x.close()
        with open(os.path.join(tmp, "prometheus.log"), "rb") as f:
            print("----- prometheus log -----\n" + f.read().decode("utf-8", "replace")[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
