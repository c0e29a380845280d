"""The connection to Redis: health, metrics, outages and recovery.

Real redis-server processes on free ports (redisproc.py). This release uses
Redis for its connection state only (history stays in memory); these tests
pin what an operator sees: /health and /metrics follow Redis going away
(SIGKILL, or SIGSTOP: a Redis that stops answering) and coming back, the bus
keeps routing live messages throughout, and the server starts and serves
even when Redis is not there yet.
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
    m = server.metrics()
    assert m['arqonbus_storage_up{backend="redis"}'] == 1
    assert m["arqonbus_redis_connects_total"] == 1
    assert m["arqonbus_redis_disconnects_total"] == 0

    redis.kill()
    body = wait_health(server, 503, 5)
    assert body["status"] == "degraded" and body["reason"] == "redis unreachable"
    assert body["detail"]
    assert server.metrics()['arqonbus_storage_up{backend="redis"}'] == 0
    assert server.metrics()["arqonbus_redis_disconnects_total"] == 1
    routes(server)  # live routing does not depend on Redis

    redis.restart()
    body = wait_health(server, 200, 10)  # reconnect backoff is at most 5 s
    assert body["status"] == "ok"
    m = server.metrics()
    assert m['arqonbus_storage_up{backend="redis"}'] == 1
    assert m["arqonbus_redis_connects_total"] == 2
    routes(server)
    log = server.log()
    assert "component=redis msg=disconnected" in log and log.count("component=redis msg=connected") == 2


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


def stream(redis_server, channel):
    import redis as redis_py
    room, ch = channel.split(":")
    r = redis_py.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        return r.xrange("arqon:room:%s:channel:%s" % (room, ch))
    finally:
        r.close()


def test_stored_messages_are_written_through_to_their_stream(make_server, redis):
    server = make_server(args=["--redis-url", redis.url, "--redis-timeout", "1s", "--history-size", "5"])
    wait_health(server, 200, 5)
    with Bus(server.port, channel="science:explore") as a, Bus(server.port) as b:
        delivered = []
        for i in range(8):
            b.send({"type": "event", "room": "science", "channel": "explore", "payload": {"i": i}})
            env, _ = a.recv_until(lambda e: e["type"] == "event")
            delivered.append(env)
        # Room-wide and private messages are not stored, so not streamed.
        b.send({"type": "event", "room": "science", "payload": {"room": True}})
        a.recv_until(lambda e: e["type"] == "event")
        m = server.wait_metric('arqonbus_redis_stream_writes_total{result="written"}', lambda v: v == 8)
        assert m == 8
    entries = stream(redis, "science:explore")
    # MAXLEN ~ 5 trims approximately: at least the last 5, at most all 8, in order.
    assert 5 <= len(entries) <= 8
    tail = delivered[-len(entries):]
    for (sid, fields), env in zip(entries, tail):
        assert fields[b"id"].decode() == env["id"]
        assert fields[b"position"].decode() == env["position"]
        assert json.loads(fields[b"envelope"]) == env
    assert stream(redis, "science:general") == []


def test_writes_while_redis_is_down_are_skipped_and_counted(make_server, redis):
    server = make_server(args=["--redis-url", redis.url, "--redis-timeout", "1s"])
    wait_health(server, 200, 5)
    redis.kill()
    wait_health(server, 503, 5)
    with Bus(server.port, channel="science:explore") as a, Bus(server.port) as b:
        for i in range(3):
            b.send({"type": "event", "room": "science", "channel": "explore", "payload": {"i": i}})
            a.recv_until(lambda e: e["type"] == "event")  # live routing goes on
        m = server.metrics()
        assert m['arqonbus_redis_stream_writes_total{result="skipped"}'] == 3
        assert m['arqonbus_redis_stream_writes_total{result="written"}'] == 0
        # History is still answered from memory.
        reply = a.command("history", {"room": "science", "channel": "explore"})
        assert [e["payload"]["i"] for e in reply["payload"]["messages"]] == [0, 1, 2]
