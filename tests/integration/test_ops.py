"""The HTTP ops port: /health, /version, /metrics (docs/operations.md).

What a monitoring system or an operator with curl observes: JSON bodies with
the documented fields, the Prometheus text format with HELP and TYPE lines,
404 for other paths, 405 with Allow: GET for other methods, 400 for
malformed requests and 431 for oversized heads, every answer with
Connection: close; and an arqonbus_connections gauge that always equals the
number of WebSocket clients connected, on the bus and telemetry ports.

Every bus connection gets a welcome envelope first; the tests read it and
check every envelope they receive against the published schema.
"""
import asyncio
import json
import re
import subprocess
import time

import pytest
import websockets

from busprobe import counted_bus, echo_roundtrip, expect_only_close, ping_roundtrip, read_welcome
from conftest import BIN, SLOW
from envelopes import BOOTSTRAP, Bus, check, error_code
from rawws import OP_CLOSE, close_payload
from wsutil import closed_total, connect_many, http_request, reset, type_deltas

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

ENVELOPE_TYPES = {"event", "system", "command", "private", "telemetry", "error"}
ERROR_CODES = {"invalid_json", "invalid_envelope", "unsupported_version", "unknown_type", "unsupported_frame",
               "payload_too_large", "unknown_command", "invalid_argument", "not_found", "already_exists", "forbidden",
               "internal_error", "storage_unavailable", "unauthorized", "rate_limited", "limit_exceeded"}
COMMANDS = {"status", "create_channel", "delete_channel", "join_channel", "leave_channel", "list_channels",
            "channel_info", "ping", "history", "help", "authenticate"}

# Every family of docs/operations.md with its type and, for labelled ones,
# the label and its values (histograms: besides le).
FAMILIES = {
    "arqonbus_connections": ("gauge", None),
    "arqonbus_connections_opened_total": ("counter", None),
    "arqonbus_connections_closed_total": ("counter", ("reason", {
        "normal", "shutdown", "protocol_error", "slow_consumer", "heartbeat_timeout", "handshake_failed",
        "handshake_timeout", "peer_gone", "io_error", "replaced", "malformed", "token_expired", "rate_limited"})),
    "arqonbus_protocol_errors_total": ("counter", ("code", {"1002", "1007", "1009"})),
    "arqonbus_handshake_errors_total": ("counter", ("status", {"400", "401", "403", "405", "408", "426", "429", "431",
                                                               "503"})),
    "arqonbus_auth_total": ("counter", ("result", {"ok", "missing", "refused"})),
    "arqonbus_auth_reloads_total": ("counter", ("result", {"ok", "failed"})),
    "arqonbus_forbidden_total": ("counter", ("action", {"command", "room", "publish", "authenticate", "connect"})),
    "arqonbus_slow_consumer_closes_total": ("counter", None),
    "arqonbus_messages_received_total": ("counter", ("type", ENVELOPE_TYPES | {"invalid"})),
    "arqonbus_messages_delivered_total": ("counter", ("type", ENVELOPE_TYPES)),
    "arqonbus_errors_total": ("counter", ("code", ERROR_CODES)),
    "arqonbus_malformed_closes_total": ("counter", None),
    "arqonbus_limit_denials_total": ("counter", ("limit", {
        "rate", "rate_close", "subscriptions", "channels", "rooms", "connections_per_ip", "origin",
        "handshakes_per_ip", "channels_created"})),
    "arqonbus_routing_latency_seconds": ("histogram", None),
    "arqonbus_command_duration_seconds": ("histogram", ("command", COMMANDS)),
    "arqonbus_clients": ("gauge", None),
    "arqonbus_rooms": ("gauge", None),
    "arqonbus_channels": ("gauge", None),
    "arqonbus_history_messages": ("gauge", None),
    "arqonbus_storage_up": ("gauge", ("backend", {"memory"})),
    "arqonbus_telemetry_clients": ("gauge", None),
    "arqonbus_telemetry_events_total": ("counter", None),
    "arqonbus_telemetry_dropped_total": ("counter", None),
    "arqonbus_received_bytes_total": ("counter", None),
    "arqonbus_sent_bytes_total": ("counter", None),
    "arqonbus_http_requests_total": ("counter", None),
    "arqonbus_start_time_seconds": ("gauge", None),
    "arqonbus_process_resident_memory_bytes": ("gauge", None),
    "arqonbus_process_open_fds": ("gauge", None),
    "arqonbus_process_max_fds": ("gauge", None),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# The documented upper bounds of the histogram buckets (seconds), +Inf aside.
BUCKETS = [0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
           0.1, 0.25, 1]

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"\\]*)"(,|$)')


def get(server, path):
    return http_request(server.http_port, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode(), 5 * SLOW)


def check_common(status, headers, body, want_status, content_type):
    assert status == want_status, (status, body)
    assert headers["content-type"] == content_type
    assert headers["connection"].lower() == "close"
    assert int(headers["content-length"]) == len(body)


# ---- /health and /version ----------------------------------------------------

def test_health(server):
    before = time.time()
    status, headers, body = get(server, "/health")
    check_common(status, headers, body, 200, JSON)
    health = json.loads(body)
    assert health["status"] == "ok"
    assert isinstance(health["uptime_seconds"], int) and 0 <= health["uptime_seconds"] <= before - server_start(server) + 1
    assert health["connections"] == 0


def server_start(server):
    return server.metrics()["arqonbus_start_time_seconds"]


def test_version_matches_the_binary(server):
    status, headers, body = get(server, "/version")
    check_common(status, headers, body, 200, JSON)
    info = json.loads(body)
    assert info["name"] == "arqonbus"
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"]), info
    assert re.fullmatch(r"\d+\.\d+", info["protocol_version"]), info
    build = info["build"]
    assert set(build) >= {"git", "type", "compiler", "libuv"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", build["libuv"])
    # The same facts as `arqonbus --version` and the startup banner.
    out = subprocess.run([BIN, "--version"], stdout=subprocess.PIPE, timeout=10 * SLOW, check=True).stdout.decode()
    assert out.strip() == "arqonbus %s (protocol %s, git %s, %s build)" % (
        info["version"], info["protocol_version"], build["git"], build["type"])
    assert "ArqonBus %s is running" % info["version"] in server.log()


# ---- /metrics -----------------------------------------------------------------

def parse_labels(text):
    """{label: value} of the text between the braces of a sample."""
    labels, pos = {}, 0
    while pos < len(text):
        m = LABEL.match(text, pos)
        assert m, "bad labels: {%s}" % text
        assert m.group(1) not in labels, "label %s twice: {%s}" % (m.group(1), text)
        labels[m.group(1)] = m.group(2)
        pos = m.end()
    return labels


def parse_exposition(text):
    """Checks the Prometheus text format line by line; returns
    ({family: (type, help)}, [(family, sample name, {label: value}, value)])."""
    families, samples = {}, []
    current = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, "family %s described twice" % name
            assert help_text, "empty HELP for %s" % name
            families[name] = [None, help_text]
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current, "TYPE %s does not follow its HELP" % name
            assert kind in ("counter", "gauge", "histogram"), line
            families[name][0] = kind
        else:
            m = SAMPLE.match(line)
            assert m, "not a sample line: %r" % line
            name, labels, value = m.groups()
            assert current and families[current][0], "sample %s before any HELP and TYPE" % name
            names = [current + x for x in HISTOGRAM_SUFFIXES] if families[current][0] == "histogram" else [current]
            assert name in names, "sample %s in family %s" % (name, current)
            samples.append((current, name, parse_labels(labels or ""), float(value)))
    return {k: tuple(v) for k, v in families.items()}, samples


def check_histogram(family, label, series):
    """'series' are the samples of one histogram 'family' (with 'label' on
    each, or None): per label value, cumulative buckets with increasing
    bounds ending at +Inf, whose last equals _count, and a _sum. Returns the
    bucket bounds and {label value: count}."""
    by_value = {}
    for _, name, labels, value in series:
        key = labels.pop(label) if label else None
        by_value.setdefault(key, []).append((name[len(family):], labels, value))
    bounds, counts = None, {}
    for key, rows in by_value.items():
        buckets = [(r[1], r[2]) for r in rows if r[0] == "_bucket"]
        assert all(set(lb) == {"le"} for lb, _ in buckets), (family, key, buckets)
        les = [lb["le"] for lb, _ in buckets]
        assert les[-1] == "+Inf" and len(les) > 1, (family, key, les)
        values = [float(le) for le in les[:-1]]
        assert values == sorted(set(values)) and values[0] > 0, (family, key, les)
        assert bounds in (None, les), "%s: the buckets of %r differ" % (family, key)
        bounds = les
        cumulative = [v for _, v in buckets]
        assert cumulative == sorted(cumulative), (family, key, cumulative)
        rest = [(r[0], r[1]) for r in rows if r[0] != "_bucket"]
        assert rest == [("_sum", {}), ("_count", {})], (family, key, rest)
        total, count = rows[-2][2], rows[-1][2]
        assert count == cumulative[-1] and total >= 0, (family, key, rows)
        counts[key] = count
    return bounds, counts


def test_metrics_exposition(server):
    status, headers, body = get(server, "/metrics")
    check_common(status, headers, body, 200, PROMETHEUS)
    families, samples = parse_exposition(body.decode())
    assert {name: kind for name, (kind, _) in families.items()} == {k: v[0] for k, v in FAMILIES.items()}
    histogram_bounds = []
    for name, (kind, labels) in FAMILIES.items():
        mine = [s for s in samples if s[0] == name]
        assert all(s[3] >= 0 for s in mine)
        if kind == "histogram":
            bounds, counts = check_histogram(name, labels and labels[0], mine)
            assert set(counts) == (labels[1] if labels else {None}), (name, counts)
            assert all(c == 0 for c in counts.values()), (name, counts)  # nothing was routed or run yet
            histogram_bounds.append(bounds)
        elif labels is None:
            assert [(s[1], s[2]) for s in mine] == [(name, {})], name
        else:
            assert all(s[1] == name and set(s[2]) == {labels[0]} for s in mine), name
            assert sorted(s[2][labels[0]] for s in mine) == sorted(labels[1]), name
    for bounds in histogram_bounds:
        assert [float(le) for le in bounds] == BUCKETS + [float("inf")], bounds
    assert all(v == int(v) for family, name, _, v in samples
               if family != "arqonbus_start_time_seconds" and not name.endswith("_sum"))
    start = server_start(server)
    assert time.time() - 600 < start <= time.time()
    # A fresh server: no clients, the bootstrap channels and the telemetry
    # and dashboard channels (room integriguard), nothing in history, memory
    # storage up, and the process figures.
    m = server.metrics()
    assert (m["arqonbus_clients"], m["arqonbus_rooms"], m["arqonbus_channels"], m["arqonbus_history_messages"],
            m['arqonbus_storage_up{backend="memory"}'], m["arqonbus_telemetry_clients"]) == \
        (0, 2, len(BOOTSTRAP) + 2, 0, 1, 0), m
    assert m["arqonbus_process_resident_memory_bytes"] > 1 << 20
    assert 3 < m["arqonbus_process_open_fds"] <= m["arqonbus_process_max_fds"]


def test_metrics_count_requests_and_traffic(server):
    before = server.metrics()
    again = server.metrics()
    # Each request on the ops port is counted, the one reading the counter included.
    assert again["arqonbus_http_requests_total"] == before["arqonbus_http_requests_total"] + 1
    get(server, "/nope")
    http_request(server.http_port, b"PUT /health HTTP/1.1\r\n\r\n")
    http_request(server.http_port, b"GARBAGE\r\n\r\n")
    # A bus client whose socket counts every byte: the welcome, an event that
    # comes back (echo), a command and its reply, and two messages that get
    # error envelopes (a binary one, and text that is not JSON).
    bus, sock, request_len = counted_bus(server.port, timeout=5 * SLOW, echo=True, channel="t:echo")
    with bus:
        ws = bus.ws
        echo_roundtrip(bus, "hello")
        ping_roundtrip(bus, "arq_metrics")
        bus.send_binary(b"\x00\x01")
        assert error_code(bus.recv()) == "unsupported_frame"
        bus.send("not json")
        assert error_code(bus.recv()) == "invalid_json"
        ws.send_frame(OP_CLOSE, close_payload(1000))
        assert expect_only_close(ws, 5 * SLOW) == (1000, "")
        ws.wait_eof(5 * SLOW)
    normal = 'arqonbus_connections_closed_total{reason="normal"}'
    server.wait_metric(normal, lambda v: v == before[normal] + 1)
    m = server.metrics()
    assert m["arqonbus_http_requests_total"] == again["arqonbus_http_requests_total"] + 5
    assert m["arqonbus_connections_opened_total"] == before["arqonbus_connections_opened_total"] + 1
    # Received: the four data messages (the close frame is not one), two of
    # them not envelopes.
    assert type_deltas(before, m, "arqonbus_messages_received_total") == {"event": 1, "command": 1, "invalid": 2}
    # Delivered: every envelope queued, welcome, echo, reply and both errors.
    assert type_deltas(before, m, "arqonbus_messages_delivered_total") == {"system": 2, "event": 1, "error": 2}
    errors = {k: m[k] - before[k] for k in m if k.startswith("arqonbus_errors_total{") and m[k] != before[k]}
    assert errors == {'arqonbus_errors_total{code="unsupported_frame"}': 1,
                      'arqonbus_errors_total{code="invalid_json"}': 1}, errors
    # Bytes: in, everything the client sent after its upgrade request (four
    # frames and an 8-byte close frame); out, everything it received, the
    # 101 response and the 4-byte close frame included.
    assert sock.sent - request_len > 8
    assert m["arqonbus_received_bytes_total"] - before["arqonbus_received_bytes_total"] == sock.sent - request_len
    assert m["arqonbus_sent_bytes_total"] - before["arqonbus_sent_bytes_total"] == sock.received


def test_metrics_count_replaced_and_malformed_closes(server):
    """The closes of protocol v1 have reasons of their own: a connection
    replaced by a newer one with its client_id (4001), and a client closed
    for max_malformed malformed messages in a row (1008)."""
    before = server.metrics()
    t = 5 * SLOW
    with Bus(server.port, timeout=t, client_id="twin") as old, Bus(server.port, timeout=t, client_id="twin") as new:
        assert expect_only_close(old.ws, t) == (4001, "replaced by a new connection with the same client_id")
        old.ws.wait_eof(t)
        ping_roundtrip(new, "arq_new_twin")
    with Bus(server.port, timeout=t) as bad:
        limit = bad.welcome["payload"]["limits"]["max_malformed"]
        assert limit == 10
        for i in range(limit):
            if i % 2:
                bad.send_binary(b"\x00")
                assert error_code(bad.recv()) == "unsupported_frame"
            else:
                bad.send("not json %d" % i)
                assert error_code(bad.recv()) == "invalid_json"
        assert expect_only_close(bad.ws, t) == (1008, "too many malformed messages")
        bad.ws.wait_eof(t)
    server.wait_metric("arqonbus_connections", lambda v: v == 0)
    m = server.metrics()
    delta = {k: m[k] - before[k] for k in m}
    closed = {k.split('"')[1]: v for k, v in delta.items() if k.startswith("arqonbus_connections_closed_total{")}
    assert closed["replaced"] == 1 and closed["malformed"] == 1, closed
    assert closed["normal"] + closed["peer_gone"] + closed["io_error"] == 1, closed  # the new twin
    assert sum(closed.values()) == 3, closed
    # Neither is a WebSocket protocol violation or a slow consumer.
    assert all(v == 0 for k, v in delta.items() if k.startswith("arqonbus_protocol_errors_total{")), delta
    assert delta["arqonbus_slow_consumer_closes_total"] == 0
    # Received: the ping and the 10 malformed messages; delivered: three
    # welcomes, the pong and ten errors.
    assert type_deltas(before, m, "arqonbus_messages_received_total") == {"command": 1, "invalid": 10}
    assert type_deltas(before, m, "arqonbus_messages_delivered_total") == {"system": 3 + 1, "error": 10}
    assert delta["arqonbus_malformed_closes_total"] == 1


# ---- errors --------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/nope", "/health/", "/HEALTH", "/metrics/x", "/version.json"])
def test_unknown_path_is_404(server, path):
    status, headers, body = get(server, path)
    check_common(status, headers, body, 404, JSON)
    assert json.loads(body) == {"error": "not_found"}


def test_query_string_is_ignored(server):
    status, headers, body = get(server, "/health?verbose=1")
    check_common(status, headers, body, 200, JSON)
    assert json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", id="POST-with-body"),
    pytest.param(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", id="POST"),
    pytest.param(b"PUT /version HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", id="PUT"),
    pytest.param(b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n", id="DELETE"),
    pytest.param(b"OPTIONS /nope HTTP/1.1\r\nHost: x\r\n\r\n", id="OPTIONS-unknown-path"),
])
def test_other_methods_are_405_with_allow_get(server, request_bytes):
    status, headers, body = http_request(server.http_port, request_bytes, 5 * SLOW)
    check_common(status, headers, body, 405, JSON)
    assert headers["allow"] == "GET"
    assert json.loads(body) == {"error": "method_not_allowed"}


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GARBAGE\r\n\r\n", id="no-method-line"),
    pytest.param(b"\r\n\r\n", id="empty"),
    pytest.param(b"GET health HTTP/1.1\r\n\r\n", id="relative-path"),
    pytest.param(b"get /health HTTP/1.1\r\n\r\n", id="lower-case-method"),
    pytest.param(b"GET /health HTTP/9.9\r\n\r\n", id="bad-version"),
    pytest.param(b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n", id="header-without-colon"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", id="space-before-colon"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", id="folded-header"),
    pytest.param(b"GET /health HTTP/1.1\r\nX: \x01\r\n\r\n", id="control-byte"),
])
def test_malformed_request_is_400(server, request_bytes):
    status, headers, body = http_request(server.http_port, request_bytes, 5 * SLOW)
    check_common(status, headers, body, 400, "text/plain; charset=utf-8")
    assert body == b"malformed HTTP request"


def padded_get(size):
    base = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: \r\n\r\n"
    req = base.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (size - len(base)))
    assert len(req) == size
    return req


def test_head_of_exactly_max_header_size_is_served(server):
    status, headers, body = http_request(server.http_port, padded_get(8192), 5 * SLOW)
    check_common(status, headers, body, 200, JSON)


@pytest.mark.parametrize("size", [8193, 20000])
def test_oversized_head_is_431(server, size):
    status, headers, body = http_request(server.http_port, padded_get(size), 5 * SLOW)
    check_common(status, headers, body, 431, "text/plain; charset=utf-8")
    assert body == b"request header fields too large"


def test_too_many_header_fields_is_431(server):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(100))
    status, headers, body = http_request(server.http_port, b"GET /health HTTP/1.1\r\n" + fields + b"\r\n", 5 * SLOW)
    check_common(status, headers, body, 431, "text/plain; charset=utf-8")


def test_ops_server_keeps_serving_after_errors(server):
    for req in (b"GARBAGE\r\n\r\n", padded_get(9000), b"POST / HTTP/1.1\r\n\r\n"):
        http_request(server.http_port, req, 5 * SLOW)
    status, _, body = get(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


# ---- the connections gauge -------------------------------------------------------

def gauge(server):
    """arqonbus_connections, checked against the count in /health."""
    value = server.metrics()["arqonbus_connections"]
    status, _, body = get(server, "/health")
    assert status == 200 and json.loads(body)["connections"] == value
    return value


def wait_gauge(server, n):
    server.wait_metric("arqonbus_connections", lambda v: v == n)
    assert gauge(server) == n


def test_connections_gauge_follows_connects_and_disconnects(server):
    assert gauge(server) == 0

    async def run():
        bus = connect_many(server.port, 5)
        telemetry = connect_many(server.telemetry_port, 2)
        py = [await websockets.connect(server.url, open_timeout=5 * SLOW) for _ in range(2)]
        try:
            # Every bus client has its welcome (read, so that closing a
            # socket below sends a FIN, not a reset for unread data).
            for ws in bus:
                read_welcome(ws, 5 * SLOW)
            for ws in telemetry:  # monitoring clients get a welcome of their own
                read_welcome(ws, 5 * SLOW)
            for ws in py:
                welcome = check(await asyncio.wait_for(ws.recv(), 5 * SLOW))
                assert welcome["payload"]["event"] == "welcome", welcome
            # Handshakes done, every client counted; ops requests are not.
            assert gauge(server) == 9
            # A clean close, a close frame without waiting, a reset, a FIN
            # without a close frame, a library close, a telemetry close.
            bus[0].send_frame(OP_CLOSE, close_payload(1000))
            assert expect_only_close(bus[0], 5 * SLOW) == (1000, "")
            bus[0].wait_eof(5 * SLOW)
            bus[0].close()
            wait_gauge(server, 8)
            bus[1].send_frame(OP_CLOSE, close_payload(1001))
            bus[1].close()
            reset(bus[2].sock)
            bus[3].close()
            wait_gauge(server, 5)
            await asyncio.wait_for(py[0].close(), 5 * SLOW)
            telemetry[0].close()
            wait_gauge(server, 3)
            # New clients are counted again.
            more = connect_many(server.port, 3)
            assert gauge(server) == 6
            for ws in more:
                read_welcome(ws, 5 * SLOW)
            for ws in more + bus[4:] + telemetry[1:]:
                ws.close()
            await asyncio.wait_for(py[1].close(), 5 * SLOW)
            wait_gauge(server, 0)
        finally:
            for ws in bus + telemetry:
                ws.close()
            for ws in py:
                await ws.close()
    asyncio.run(run())
    m = server.metrics()
    assert m["arqonbus_connections_opened_total"] == 12
    assert closed_total(m) == 12
