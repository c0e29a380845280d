"""The connection to Redis: health, metrics, outages and recovery.

Real redis-server processes on free ports (redisproc.py). These tests pin
what an operator sees: /health and /metrics follow Redis going away
(SIGKILL, or SIGSTOP: a Redis that stops answering) and coming back, the bus
keeps routing live messages throughout, the server starts and serves even
when Redis is not there yet, channel messages are written to their streams
(the stream id is the position), and messages published during an outage
are delivered here at once, held, and written back in order when Redis is
back. Durable history itself is in test_redis_history.py.
"""
import json
import os
import subprocess
import tempfile
import time

import pytest

from conftest import BIN, SLOW
from envelopes import Bus
from redisproc import RedisServer


@pytest.fixture
def redis():
    r = RedisServer(tempfile.mkdtemp(prefix="arqonbus-redis-")).start()
    try:
        yield r
    finally:
        r.stop()


def health(server):
    status, _, body = server.http("/health")
    return status, json.loads(body)


def wait_health(server, want_status, timeout):
    deadline = time.monotonic() + timeout * SLOW
    last = None
    while time.monotonic() < deadline:
        last = health(server)
        if last[0] == want_status:
            return last[1]
        time.sleep(0.05)
    raise AssertionError("/health never answered %d (last %r)" % (want_status, last))


def routes(server):
    """A live message still goes from one client to another."""
    with Bus(server.port, channel="science:explore") as a, Bus(server.port, channel="science:explore") as b:
        a.recv_until(lambda e: e["payload"].get("event") == "client_joined")
        b.send({"type": "event", "room": "science", "channel": "explore", "payload": {"n": 1}})
        env = a.recv_until(lambda e: e["type"] == "event")[0]
        assert env["payload"] == {"n": 1} and env["from"] == b.id


def test_health_and_metrics_follow_redis(make_server, redis):
    server = make_server(args=["--redis-url", redis.url, "--redis-timeout", "1s"])
    body = wait_health(server, 200, 5)
    assert body["status"] == "ok" and body["storage"] == "redis"
    # A node has two connections per Redis: one for writes and queries, one
    # that waits in XREAD BLOCK. The counters add them up.
    m = server.metrics()
    assert m['arqonbus_storage_up{backend="redis"}'] == 1
    assert m["arqonbus_redis_connects_total"] == 2
    assert m["arqonbus_redis_disconnects_total"] == 0

    redis.kill()
    body = wait_health(server, 503, 5)
    assert body["status"] == "degraded" and body["reason"] == "redis unreachable"
    assert body["detail"]
    assert server.metrics()['arqonbus_storage_up{backend="redis"}'] == 0
    assert server.wait_metric("arqonbus_redis_disconnects_total", lambda v: v >= 2) == 2
    routes(server)  # live routing does not depend on Redis

    redis.restart()
    body = wait_health(server, 200, 10)  # reconnect backoff is at most 5 s
    assert body["status"] == "ok"
    m = server.metrics()
    assert m['arqonbus_storage_up{backend="redis"}'] == 1
    assert m["arqonbus_redis_connects_total"] == 4
    assert m["arqonbus_redis_disconnects_total"] == 2
    routes(server)
    log = server.log()
    assert log.count("component=redis msg=disconnected") == 2
    assert log.count("component=redis msg=connected") == 4


def test_a_redis_that_stops_answering_counts_as_lost(make_server, redis):
    server = make_server(args=["--redis-url", redis.url, "--redis-timeout", "1s"])
    wait_health(server, 200, 5)
    redis.pause()
    try:
        body = wait_health(server, 503, 6)
        assert "did not answer" in body["detail"] or "no answer" in body["detail"]
        assert server.metrics()["arqonbus_redis_timeouts_total"] >= 1
        routes(server)
    finally:
        redis.resume()
    wait_health(server, 200, 10)


def test_server_starts_without_redis_and_connects_when_it_comes(make_server, redis):
    port = redis.port
    redis.kill()
    server = make_server(args=["--redis-url", "redis://localhost:%d" % port, "--redis-timeout", "1s"])
    body = wait_health(server, 503, 5)
    assert body["status"] == "degraded"
    routes(server)
    redis.start()
    wait_health(server, 200, 10)


def test_unresolvable_host_is_an_outage_not_a_failure_to_start(make_server):
    server = make_server(args=["--redis-url", "redis://no-such-host.invalid:6379", "--redis-timeout", "1s"])
    body = wait_health(server, 503, 10)
    assert body["status"] == "degraded"
    routes(server)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://", "redis://host:0", "redis://host:70000",
                                 "redis://host:6379/x", "redis://[::1"])
def test_bad_redis_url_stops_the_start(url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    p = subprocess.run([BIN, "--redis-url", url], capture_output=True, text=True, timeout=10 * SLOW, env=env)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis_url" in lines[0], p.stderr


def event(i, **extra):
    env = {"type": "event", "room": "science", "channel": "explore", "payload": {"i": i}}
    env.update(extra)
    return env


def stored_as(entry):
    """The envelope a subscriber gets for a stream entry: the stored JSON
    text with the stream id added as its last member, "position"."""
    sid, fields = entry
    env = json.loads(fields["envelope"])
    assert "position" not in env, fields
    env["position"] = sid
    return env


def test_stored_messages_are_written_through_to_their_stream(make_server, redis):
    server = make_server(args=["--redis-url", redis.url, "--redis-timeout", "1s", "--history-size", "5"])
    wait_health(server, 200, 5)
    with Bus(server.port, channel="science:explore") as a, Bus(server.port) as b:
        delivered = []
        for i in range(8):
            b.send(event(i))
            env, _ = a.recv_until(lambda e: e["type"] == "event")
            delivered.append(env)
        # Room-wide and private messages are not stored, so not streamed.
        b.send({"type": "event", "room": "science", "payload": {"room": True}})
        env = a.recv_until(lambda e: e["type"] == "event")[0]
        assert env["payload"] == {"room": True} and "position" not in env
        m = server.wait_metric('arqonbus_redis_stream_writes_total{result="written"}', lambda v: v >= 8)
        assert m == 8
        assert server.metrics()['arqonbus_redis_stream_writes_total{result="failed"}'] == 0
    assert [e["payload"]["i"] for e in delivered] == list(range(8))
    for env in delivered:
        assert list(env)[-1] == "position", env  # the last member
    entries = redis.entries("science:explore")
    # MAXLEN ~ 5 trims approximately: at least the last 5, at most all 8, in order.
    assert 5 <= len(entries) <= 8
    tail = delivered[-len(entries):]
    for entry, env in zip(entries, tail):
        sid, fields = entry
        assert sid == env["position"]  # the stream id is the position
        assert set(fields) == {"id", "node", "from", "skip", "type", "envelope"}, fields
        assert fields["id"] == env["id"]
        assert fields["from"] == env["from"] == b.id
        assert (fields["skip"], fields["type"]) == ("1", "event")  # b's echo is off
        assert json.dumps(stored_as(entry)) == json.dumps(env)  # same members, same order
    assert redis.entries("science:general") == []


def test_writes_while_redis_is_down_are_held_and_written_back(make_server, redis):
    server = make_server(args=["--redis-url", redis.url, "--redis-timeout", "1s"])
    wait_health(server, 200, 5)
    redis.kill()
    wait_health(server, 503, 5)
    with Bus(server.port, channel="science:explore") as a, Bus(server.port) as b:
        held = []
        for i in range(3):
            b.send(event(i, id="arq_held%d" % i, ack=True))
            env = a.recv_until(lambda e: e["type"] == "event")[0]  # live routing goes on
            assert env["id"] == "arq_held%d" % i and env["payload"] == {"i": i}
            assert "position" not in env  # not stored yet
            held.append(env)
        m = server.metrics()
        assert m["arqonbus_redis_held_total"] == 3
        assert m["arqonbus_redis_held_messages"] == 3
        assert m["arqonbus_redis_held_bytes"] > 0
        assert m["arqonbus_redis_written_back_total"] == 0
        assert m["arqonbus_redis_refused_total"] == 0
        assert m['arqonbus_redis_stream_writes_total{result="written"}'] == 0
        # History is still answered, from what this node delivered.
        reply = a.command("history", {"room": "science", "channel": "explore"})
        assert reply["type"] == "system" and reply["payload"]["messages"] == held
        # No acknowledgement while nothing is stored.
        b.expect_nothing(0.3)

        redis.restart()
        wait_health(server, 200, 10)
        acks = [b.recv_until(lambda e: e["type"] == "system" and e["payload"].get("event") == "ack")[0]
                for _ in range(3)]
        assert [k["correlation_id"] for k in acks] == ["arq_held0", "arq_held1", "arq_held2"]
        assert [k["payload"]["id"] for k in acks] == ["arq_held0", "arq_held1", "arq_held2"]
        m = server.wait_metric("arqonbus_redis_written_back_total", lambda v: v >= 3)
        assert m == 3
        m = server.metrics()
        assert m["arqonbus_redis_held_messages"] == 0 and m["arqonbus_redis_held_bytes"] == 0
        assert m['arqonbus_redis_stream_writes_total{result="written"}'] == 3
        assert m["arqonbus_redis_held_total"] == 3

        # Written back in order, the ack's position is the stream id.
        entries = redis.entries("science:explore")
        assert [f["id"] for _, f in entries] == ["arq_held0", "arq_held1", "arq_held2"]
        assert [sid for sid, _ in entries] == [k["payload"]["position"] for k in acks]
        assert all(f["wb"] == "1" for _, f in entries)
        for entry, env in zip(entries, held):
            expected = dict(env, position=entry[0])
            assert stored_as(entry) == expected

        # The subscriber got them once (during the outage): the next message
        # it receives is the one published now, stored at once after them.
        b.send(event(3, id="arq_after", ack=True))
        env = a.recv_until(lambda e: e["type"] == "event")[0]
        assert env["id"] == "arq_after" and env["position"] == redis.entries("science:explore")[-1][0]
        ack = b.recv_until(lambda e: e["type"] == "system" and e["payload"].get("event") == "ack")[0]
        assert ack["payload"] == {"event": "ack", "id": "arq_after", "position": env["position"]}
        # History now comes from the stream, with positions.
        reply = a.command("history", {"room": "science", "channel": "explore"})
        assert reply["payload"]["messages"] == [stored_as(e) for e in redis.entries("science:explore")]
