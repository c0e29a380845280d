"""Durable history on Redis Streams, acknowledged publishing, and outages.

Real redis-server processes on free ports (redisproc.py) and the real
arqonbus binary. What a user relies on in Redis mode: history outlives the
ArqonBus process; a client that resumes with `since` (its last position)
gets exactly what it missed, page by page; trimmed history is reported as a
gap; an acknowledgement carries the stream id the subscribers see as the
position; and when Redis dies in the middle of a stream of acknowledged
publishes, nothing acknowledged is lost and nothing goes unanswered: in
degrade mode (the default) every message is written back and acknowledged,
in strict mode each one is either acknowledged or refused with
storage_unavailable. The outage buffer is bounded, and history is still
answered (from the node's memory) while Redis is away.

Every envelope received is checked against the published schema
(envelopes.check, directly or through Bus), also the ones inside history
replies and the ones read by the background readers.
"""
import json
import select
import signal
import tempfile
import threading
import time

import pytest

from conftest import SLOW
from envelopes import Bus, check, error_code
from rawws import OP_TEXT, frame
from redisproc import RedisServer

CHANNEL = "science:explore"


@pytest.fixture
def redis():
    r = RedisServer(tempfile.mkdtemp(prefix="arqonbus-redis-")).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def durable_redis():
    """A Redis that loses nothing it answered, even to SIGKILL."""
    r = RedisServer(tempfile.mkdtemp(prefix="arqonbus-redis-"), appendonly=True, appendfsync="always").start()
    try:
        yield r
    finally:
        r.stop()


# ---- helpers -------------------------------------------------------------------


def health(server):
    status, _, body = server.http("/health")
    return status, json.loads(body)


def wait_health(server, want_status, timeout=10):
    deadline = time.monotonic() + timeout * SLOW
    last = None
    while time.monotonic() < deadline:
        last = health(server)
        if last[0] == want_status:
            return last[1]
        time.sleep(0.05)
    raise AssertionError("/health never answered %d (last %r)" % (want_status, last))


def start(make_server, redis, *args):
    """An arqonbus on 'redis', once it is connected."""
    server = make_server(args=["--redis-url", redis.url, "--redis-timeout", "1s"] + list(args))
    body = wait_health(server, 200)
    assert body["status"] == "ok" and body["storage"] == "redis", body
    return server


def storage_up(server):
    return server.metrics()['arqonbus_storage_up{backend="redis"}']


def event(mid=None, i=0, channel=CHANNEL, **extra):
    room, ch = channel.split(":")
    env = {"type": "event", "room": room, "channel": ch, "payload": {"i": i}}
    if mid:
        env["id"] = mid
    env.update(extra)
    return env


def is_ack(env):
    return env["type"] == "system" and env["payload"].get("event") == "ack"


def is_refusal(env):
    return env["type"] == "error" and env["payload"]["code"] == "storage_unavailable"


def is_event(env):
    return env["type"] == "event"


def pos_key(position):
    """A stream id "ms-seq" as a tuple that sorts like the stream."""
    ms, _, seq = position.partition("-")
    return int(ms), int(seq or 0)


def stored_as(entry):
    """The envelope subscribers get for a stream entry: the stored JSON text
    with the stream id as its last member, "position"."""
    sid, fields = entry
    env = json.loads(fields["envelope"])
    assert "position" not in env, fields
    env["position"] = sid
    return check(env)


def publish_acked(bus, ids, channel=CHANNEL, batch=50):
    """Publishes one event per id with "ack": true (a batch at a time) and
    returns the positions of their acks, in order. Acks arrive in order."""
    positions = []
    for start_at in range(0, len(ids), batch):
        chunk = ids[start_at:start_at + batch]
        for k, mid in enumerate(chunk):
            bus.send(event(mid, start_at + k, channel, ack=True))
        for mid in chunk:
            ack, skipped = bus.recv_until(is_ack)
            assert not [e for e in skipped if e["type"] == "error"], skipped
            room, ch = channel.split(":")
            assert ack["correlation_id"] == mid and ack["payload"]["id"] == mid, ack
            assert (ack["room"], ack["channel"]) == (room, ch), ack
            positions.append(ack["payload"]["position"])
    assert positions == sorted(positions, key=pos_key) and len(set(positions)) == len(positions)
    return positions


def history(bus, channel=CHANNEL, **payload):
    """The payload of a successful history reply; its messages are checked."""
    room, ch = channel.split(":")
    r = bus.command("history", {"room": room, "channel": ch}, **payload)
    assert r["type"] == "system" and r["command"] == "history", r
    p = r["payload"]
    assert (p["room"], p["channel"]) == (room, ch), p
    assert p["count"] == len(p["messages"])
    for m in p["messages"]:
        check(m)
    return p


def page_since(bus, since, limit, channel=CHANNEL):
    """Reads history after 'since' page by page until more is false; returns
    (messages, [(count, more, gap) of each page])."""
    messages, pages = [], []
    for _ in range(1000):
        p = history(bus, channel, since=since, limit=limit)
        assert p["since"] == since and p["limit"] == limit, p
        pages.append((p["count"], p["more"], p["gap"]))
        messages += p["messages"]
        if not p["more"]:
            return messages, pages
        assert p["count"] == limit, p
        since = p["messages"][-1]["position"]
    raise AssertionError("history never said more: false")


def ids(messages):
    return [m["id"] for m in messages]


class Reader(threading.Thread):
    """Reads everything a Bus receives on a thread of its own, so that the
    test can send as fast as it can meanwhile. It only parses (to keep up);
    check_all() checks every envelope against the schema."""

    def __init__(self, bus):
        super().__init__(daemon=True)
        self.bus = bus
        self.envs = []
        self.failure = None
        self.stopping = threading.Event()
        self.on_env = None  # called on this thread with each envelope
        bus.ws.sock.settimeout(30 * SLOW)  # shared with the sender: never hit in a working run
        self.start()

    def run(self):
        ws = self.bus.ws
        try:
            while not self.stopping.is_set():
                if not ws.buf and not select.select([ws.sock], [], [], 0.05)[0]:
                    continue
                op, payload = ws.recv_message()
                assert op == OP_TEXT, "expected a text frame, got opcode %r: %r" % (op, payload[:200])
                env = json.loads(payload)
                self.envs.append(env)
                if self.on_env:
                    self.on_env(env)
        except Exception as e:  # reported by wait() and check_all()
            self.failure = e

    def snapshot(self, pred=lambda e: True):
        return [e for e in list(self.envs) if pred(e)]

    def wait(self, cond, what, timeout=20):
        """Waits until cond() holds; fails after 'timeout' seconds."""
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            if cond():
                return
            if self.failure:
                raise AssertionError("reader of %s failed: %r" % (self.bus.id, self.failure))
            time.sleep(0.005)
        raise AssertionError("timed out waiting for %s (%d envelopes read)" % (what, len(self.envs)))

    def stop(self):
        self.stopping.set()
        self.join(5)

    def check_all(self):
        """Checks every envelope read against the schema."""
        if self.failure:
            raise AssertionError("reader of %s failed: %r" % (self.bus.id, self.failure))
        for env in self.envs:
            check(env)


# ---- history outlives the server, since, paging, trimming ------------------------


def test_history_survives_an_arqonbus_restart(make_server, redis):
    first = start(make_server, redis)
    with Bus(first.port, channel=CHANNEL) as sub, Bus(first.port) as pub:
        positions = publish_acked(pub, ["arq_keep%d" % i for i in range(20)])
        delivered = [sub.recv_until(is_event)[0] for _ in range(20)]
    assert ids(delivered) == ["arq_keep%d" % i for i in range(20)]
    assert [m["position"] for m in delivered] == positions
    assert first.stop() == 0  # SIGTERM

    second = start(make_server, redis)
    with Bus(second.port) as reader:
        p = history(reader)
        assert p["messages"] == delivered  # same ids, positions, timestamps, payloads
        assert (p["count"], p["more"]) == (20, False)
        p = history(reader, since="0")
        assert p["messages"] == delivered and p["gap"] is False
        p = history(reader, limit=5)
        assert p["messages"] == delivered[-5:] and p["more"] is True
    assert [stored_as(e) for e in redis.entries(CHANNEL)] == delivered


def test_since_the_last_position_returns_exactly_what_was_missed(make_server, redis):
    server = start(make_server, redis)
    with Bus(server.port) as pub:
        with Bus(server.port, channel=CHANNEL) as sub:
            publish_acked(pub, ["arq_seen%d" % i for i in range(3)])
            seen = [sub.recv_until(is_event)[0] for _ in range(3)]
            last = seen[-1]["position"]
        missed_ids = ["arq_missed%d" % i for i in range(5)]
        positions = publish_acked(pub, missed_ids)
        publish_acked(pub, ["arq_other0"], channel="science:general")  # another channel is not mixed in
        with Bus(server.port, channel=CHANNEL) as sub:
            p = history(sub, since=last)
            assert (p["since"], p["gap"], p["more"], p["count"]) == (last, False, False, 5)
            assert ids(p["messages"]) == missed_ids
            assert [m["position"] for m in p["messages"]] == positions
            assert p["messages"] == [stored_as(e) for e in redis.entries(CHANNEL)][3:]
            # The last message id works as well as its position.
            p = history(sub, since=seen[-1]["id"])
            assert ids(p["messages"]) == missed_ids and p["gap"] is False
            # Nothing after the newest.
            p = history(sub, since=positions[-1])
            assert (p["messages"], p["gap"], p["more"]) == ([], False, False)


def test_since_across_a_restart_pages_with_more(make_server, redis):
    first = start(make_server, redis)
    with Bus(first.port, channel=CHANNEL) as sub, Bus(first.port) as pub:
        publish_acked(pub, ["arq_before%d" % i for i in range(3)])
        before = [sub.recv_until(is_event)[0] for _ in range(3)]
    last = before[-1]["position"]
    assert first.stop() == 0

    second = start(make_server, redis)
    missed_ids = ["arq_after%d" % i for i in range(7)]
    with Bus(second.port) as pub:
        positions = publish_acked(pub, missed_ids)
    assert pos_key(positions[0]) > pos_key(last)
    with Bus(second.port, channel=CHANNEL) as sub:
        messages, pages = page_since(sub, last, 3)
        assert pages == [(3, True, False), (3, True, False), (1, False, False)]
        assert ids(messages) == missed_ids
        assert [m["position"] for m in messages] == positions
        messages, pages = page_since(sub, last, 10)
        assert pages == [(7, False, False)] and ids(messages) == missed_ids
        # Everything, both runs, oldest first.
        assert ids(history(sub)["messages"]) == ids(before) + missed_ids


def test_trimmed_history_is_reported_as_a_gap(make_server, redis):
    # Streams keep at least 1000 entries whatever history_size (they are the
    # delivery log between nodes too), and MAXLEN ~ trims whole nodes of 100
    # entries: 1300 messages are surely trimmed.
    published = 1300
    server = start(make_server, redis, "--history-size", "100")
    all_ids = ["arq_t%d" % i for i in range(published)]
    with Bus(server.port) as pub:
        positions = publish_acked(pub, all_ids, batch=100)
    retained = redis.entries(CHANNEL)
    assert 100 <= len(retained) < published  # the oldest are gone
    assert [f["id"] for _, f in retained] == all_ids[-len(retained):]
    assert [sid for sid, _ in retained] == positions[-len(retained):]
    expected = [stored_as(e) for e in retained]
    with Bus(server.port, channel=CHANNEL) as sub:
        # From an early position: a gap, then every message still kept.
        messages, pages = page_since(sub, positions[0], 100)
        assert pages[0][2] is True
        assert all(gap is False for _, _, gap in pages[1:])
        assert messages == expected
        p = history(sub, since=positions[0], limit=10)
        assert p["gap"] is True and p["messages"] == expected[:10] and p["more"] is True
        # An early message id (no longer stored) is a gap as well.
        p = history(sub, since=all_ids[0], limit=10)
        assert p["gap"] is True and p["messages"] == expected[:10]
        # A recent position, or the last retained one's predecessor, is no gap.
        p = history(sub, since=positions[-10], limit=50)
        assert (p["gap"], p["more"]) == (False, False)
        assert ids(p["messages"]) == all_ids[-9:]
        assert [m["position"] for m in p["messages"]] == positions[-9:]
        p = history(sub, since=retained[0][0], limit=1)
        assert p["gap"] is False and p["messages"] == expected[1:2]


# ---- acknowledged publishing --------------------------------------------------------


def test_ack_carries_the_stream_id_subscribers_see_as_position(make_server, redis):
    server = start(make_server, redis)
    with Bus(server.port, channel=CHANNEL) as sub, Bus(server.port) as pub:
        pub.send(event("arq_acked", 1, ack=True))
        ack = pub.recv_until(is_ack)[0]
        assert ack["correlation_id"] == "arq_acked"
        assert (ack["room"], ack["channel"]) == ("science", "explore")
        position = ack["payload"]["position"]
        assert ack["payload"] == {"event": "ack", "id": "arq_acked", "position": position}
        got = sub.recv_until(is_event)[0]
        assert (got["id"], got["position"]) == ("arq_acked", position)
        assert redis.entries(CHANNEL)[-1][0] == position
        assert stored_as(redis.entries(CHANNEL)[-1]) == got

        # Without an id: the ack names the id the server gave the message.
        pub.send(event(None, 2, ack=True))
        ack = pub.recv_until(is_ack)[0]
        got = sub.recv_until(is_event)[0]
        assert got["payload"] == {"i": 2}
        assert ack["payload"] == {"event": "ack", "id": got["id"], "position": got["position"]}
        assert ack["correlation_id"] == got["id"]
        sid, fields = redis.entries(CHANNEL)[-1]
        assert (sid, fields["id"]) == (got["position"], got["id"])

        # "ack": false, or no ack: no acknowledgement.
        pub.send(event("arq_noack1", 3, ack=False))
        pub.send(event("arq_noack2", 4))
        assert ids([sub.recv_until(is_event)[0] for _ in range(2)]) == ["arq_noack1", "arq_noack2"]
        reply = pub.command("ping")
        assert reply["command"] == "pong" and not [e for e in pub.skipped if is_ack(e)], pub.skipped

        # A room-wide event is not stored: its ack has no position.
        pub.send({"type": "event", "id": "arq_roomwide", "room": "science", "payload": {}, "ack": True})
        ack = pub.recv_until(is_ack)[0]
        assert ack["payload"] == {"event": "ack", "id": "arq_roomwide"} and "channel" not in ack
        assert ack["room"] == "science"


@pytest.mark.parametrize("bad", [
    {"type": "command", "id": "arq_bad", "command": "ping", "ack": True},
    {"type": "command", "id": "arq_bad", "command": "history", "room": "science", "channel": "explore",
     "ack": False},
    {"type": "event", "id": "arq_bad", "room": "science", "channel": "explore", "payload": {}, "ack": "yes"},
    {"type": "event", "id": "arq_bad", "room": "science", "channel": "explore", "payload": {}, "ack": 1},
    {"type": "event", "id": "arq_bad", "room": "science", "channel": "explore", "payload": {}, "ack": None},
])
def test_a_misplaced_or_non_boolean_ack_is_an_invalid_envelope(make_server, redis, bad):
    server = start(make_server, redis)
    with Bus(server.port, channel=CHANNEL) as sub, Bus(server.port) as pub:
        pub.send(bad)
        err, skipped = pub.recv_until(lambda e: e["type"] in ("error", "system") and e.get("correlation_id"))
        assert error_code(err) == "invalid_envelope" and err["correlation_id"] == "arq_bad", err
        assert "ack" in err["payload"]["message"], err
        # Not stored, not delivered: the next message stored is the next one they see.
        positions = publish_acked(pub, ["arq_next"])
        got = sub.recv_until(is_event)[0]
        assert (got["id"], got["position"]) == ("arq_next", positions[0])
        assert [f["id"] for _, f in redis.entries(CHANNEL)] == ["arq_next"]


# ---- Redis killed in the middle of acknowledged publishing ----------------------------

TOTAL = 2000
KILL_AFTER_ACKS = 300
SENT_BEFORE_KILL = 1000  # the rest is sent once Redis is dead


def kill_during_publishing(server, redis, pub_reader, pub):
    """Publishes TOTAL acknowledged events from a thread as fast as it can
    (frames encoded beforehand, sent in bursts); the publisher's reader
    SIGKILLs Redis the moment the KILL_AFTER_ACKS-th ack arrives, so that
    XADDs are in flight. Messages from SENT_BEFORE_KILL on wait for the
    kill: some are surely sent during the outage. Returns the message ids."""
    mids = ["arq_k%d" % i for i in range(TOTAL)]
    frames = [frame(OP_TEXT, json.dumps(event(mid, i, ack=True)).encode()) for i, mid in enumerate(mids)]
    killed = threading.Event()
    failure = []
    acks_seen = [0]

    def on_env(env):
        if is_ack(env):
            acks_seen[0] += 1
            if acks_seen[0] == KILL_AFTER_ACKS:
                redis.proc.send_signal(signal.SIGKILL)
                killed.set()

    def send_all():
        try:
            for at in range(0, TOTAL, 20):
                if at == SENT_BEFORE_KILL and not killed.wait(30 * SLOW):
                    raise AssertionError("Redis was never killed")
                pub.ws.send(b"".join(frames[at:at + 20]))
        except Exception as e:
            failure.append(e)

    pub_reader.on_env = on_env
    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    pub_reader.wait(lambda: killed.is_set() or failure, "%d acks" % KILL_AFTER_ACKS)
    redis.proc.wait()
    sender.join(30 * SLOW)
    assert not sender.is_alive() and not failure, failure
    body = wait_health(server, 503)
    assert body["status"] == "degraded" and body["reason"] == "redis unreachable", body
    assert storage_up(server) == 0
    return mids


def answers(reader):
    """{message id: [ack or refusal envelopes]} of what the publisher got."""
    out = {}
    for e in reader.snapshot(lambda e: is_ack(e) or is_refusal(e)):
        out.setdefault(e["correlation_id"], []).append(e)
    return out


def test_redis_killed_during_acknowledged_publishing_degrade_writes_everything_back(make_server, durable_redis):
    redis = durable_redis
    server = start(make_server, redis, "--history-size", str(2 * TOTAL))  # nothing trimmed
    with Bus(server.port, channel=CHANNEL) as sub, Bus(server.port) as pub:
        sub_reader, pub_reader = Reader(sub), Reader(pub)
        try:
            mids = kill_during_publishing(server, redis, pub_reader, pub)

            # During the outage every message is either acknowledged (stored
            # before the kill) or held; none is refused.
            def all_held():
                held = server.metrics()["arqonbus_redis_held_messages"]
                return held + len(pub_reader.snapshot(is_ack)) == TOTAL

            pub_reader.wait(all_held, "every message acked or held")
            acked_before = {e["correlation_id"] for e in pub_reader.snapshot(is_ack)}
            assert len(acked_before) >= KILL_AFTER_ACKS
            assert not pub_reader.snapshot(is_refusal)
            m = server.metrics()
            assert m["arqonbus_redis_held_total"] >= TOTAL - SENT_BEFORE_KILL
            assert m["arqonbus_redis_refused_total"] == 0
            assert wait_health(server, 503)["status"] == "degraded"

            redis.start()  # same port, same directory: the AOF is loaded back
            pub_reader.wait(lambda: len(pub_reader.snapshot(is_ack)) >= TOTAL, "every message acked")
            body = wait_health(server, 200)
            assert body["status"] == "ok"
            assert storage_up(server) == 1

            # Each message got exactly one answer, an ack, in publishing order,
            # with positions that grow.
            acks = pub_reader.snapshot(is_ack)
            assert [a["correlation_id"] for a in acks] == mids
            assert not pub_reader.snapshot(is_refusal)
            assert all(a["payload"]["id"] == a["correlation_id"] for a in acks)
            positions = [a["payload"]["position"] for a in acks]
            assert positions == sorted(positions, key=pos_key) and len(set(positions)) == TOTAL

            entries = redis.entries(CHANNEL)
            by_sid = dict(entries)
            # Every acknowledged message is in the stream where its ack says.
            for a in acks:
                assert by_sid[a["payload"]["position"]]["id"] == a["correlation_id"], a
            # All messages, in order. A message whose XADD was lost with the
            # connection may be stored twice (same id): once before the kill,
            # then written back ("wb") where its ack says.
            written_back = {a["correlation_id"] for a in acks} - acked_before
            first_seen, seen = [], set()
            for sid, f in entries:
                if f["id"] not in seen:
                    seen.add(f["id"])
                    first_seen.append(f["id"])
            assert first_seen == mids
            assert {sid for sid, f in entries if f.get("wb") == "1"} == {
                a["payload"]["position"] for a in acks if a["correlation_id"] in written_back}
            for sid, f in entries:
                if f.get("wb") != "1" and f["id"] not in acked_before:
                    assert f["id"] in written_back, (sid, f)
            duplicates = len(entries) - TOTAL
            m = server.metrics()
            assert m["arqonbus_redis_held_total"] == m["arqonbus_redis_written_back_total"] == len(written_back)
            assert m["arqonbus_redis_held_messages"] == 0 and m["arqonbus_redis_held_bytes"] == 0
            assert m['arqonbus_redis_stream_writes_total{result="written"}'] == TOTAL
            assert duplicates <= len(written_back)

            # The subscriber got every message (at least once): stored ones
            # with their position, held ones at once without.
            sub_reader.wait(lambda: {e["id"] for e in sub_reader.snapshot(is_event)} >= set(mids),
                            "every message at the subscriber")
            delivered = sub_reader.snapshot(is_event)
            for e in delivered:
                if "position" in e:
                    assert stored_as((e["position"], by_sid[e["position"]])) == e
            # Held messages were delivered once each, in order, when published.
            assert [e["id"] for e in delivered if "position" not in e] == [m for m in mids if m in written_back]
            # Stored entries reach it in stream order, none twice.
            seen_positions = [e["position"] for e in delivered if "position" in e]
            assert seen_positions == sorted(set(seen_positions), key=pos_key)
            for reader in (sub_reader, pub_reader):
                reader.stop()
                reader.check_all()
        finally:
            sub_reader.stop()
            pub_reader.stop()


def test_redis_killed_during_acknowledged_publishing_strict_acks_or_refuses_each(make_server, durable_redis):
    redis = durable_redis
    server = start(make_server, redis, "--redis-strict", "true", "--history-size", str(2 * TOTAL))
    with Bus(server.port, channel=CHANNEL) as sub, Bus(server.port) as pub:
        sub_reader, pub_reader = Reader(sub), Reader(pub)
        try:
            mids = kill_during_publishing(server, redis, pub_reader, pub)
            # Each message gets its answer while Redis is still away.
            pub_reader.wait(lambda: len(answers(pub_reader)) >= TOTAL, "an answer for every message")
            got = answers(pub_reader)
            assert sorted(got) == sorted(mids)
            assert all(len(v) == 1 for v in got.values()), [v for v in got.values() if len(v) > 1][:3]
            order = [e["correlation_id"] for e in pub_reader.snapshot(lambda e: is_ack(e) or is_refusal(e))]
            assert order == mids  # answered in publishing order
            acked = [m for m in mids if is_ack(got[m][0])]
            refused = [m for m in mids if is_refusal(got[m][0])]
            assert len(acked) >= KILL_AFTER_ACKS
            assert set(refused) >= set(mids[SENT_BEFORE_KILL:])  # sent while Redis was dead
            assert acked == mids[:len(acked)]  # acks stop at the outage
            for m in refused:
                e = got[m][0]
                assert e["payload"]["id"] == m, e
                assert (e["payload"]["room"], e["payload"]["channel"]) == ("science", "explore"), e
            m = server.metrics()
            assert m["arqonbus_redis_refused_total"] == len(refused)
            assert m["arqonbus_redis_held_total"] == 0 and m["arqonbus_redis_held_messages"] == 0

            redis.start()
            assert wait_health(server, 200)["status"] == "ok"
            assert storage_up(server) == 1
            pub.send(event("arq_after", TOTAL, ack=True))
            pub_reader.wait(lambda: "arq_after" in answers(pub_reader), "the ack after recovery")
            after = answers(pub_reader)["arq_after"]
            assert len(after) == 1 and is_ack(after[0]), after

            entries = redis.entries(CHANNEL)
            by_sid = dict(entries)
            for m in acked + ["arq_after"]:
                a = (after if m == "arq_after" else got[m])[0]
                assert by_sid[a["payload"]["position"]]["id"] == m, a
            stream_ids = [f["id"] for _, f in entries]
            assert len(stream_ids) == len(set(stream_ids))  # strict mode writes nothing back
            assert all("wb" not in f for _, f in entries)
            # Refused messages are not stored, except those whose XADD Redis
            # applied just before it died (the answer was lost): only the first
            # refused ones can be in the stream.
            stored_refused = [m for m in stream_ids if m in set(refused)]
            assert stored_refused == refused[:len(stored_refused)]
            assert stream_ids == acked + stored_refused + ["arq_after"]

            # The subscriber gets what is stored, always with its position;
            # never a refused message that is not stored.
            sub_reader.wait(lambda: {e["id"] for e in sub_reader.snapshot(is_event)} >= set(acked + ["arq_after"]),
                            "every acked message at the subscriber")
            delivered = sub_reader.snapshot(is_event)
            for e in delivered:
                assert "position" in e, e
                assert stored_as((e["position"], by_sid[e["position"]])) == e
            seen_positions = [e["position"] for e in delivered]
            assert seen_positions == sorted(set(seen_positions), key=pos_key)  # stream order, none twice
            for reader in (sub_reader, pub_reader):
                reader.stop()
                reader.check_all()
        finally:
            sub_reader.stop()
            pub_reader.stop()


# ---- the outage buffer and history during an outage -----------------------------------


def test_outage_buffer_bound_refuses_the_overflow(make_server, redis):
    server = start(make_server, redis, "--redis-buffer-messages", "5")
    redis.kill()
    wait_health(server, 503)
    with Bus(server.port, channel=CHANNEL) as sub, Bus(server.port) as pub:
        held = []
        for i in range(5):
            pub.send(event("arq_b%d" % i, i, ack=True))
            got = sub.recv_until(is_event)[0]
            assert got["id"] == "arq_b%d" % i and "position" not in got, got
            held.append(got)
        pub.send(event("arq_b5", 5, ack=True))
        err, skipped = pub.recv_until(lambda e: e["type"] == "error")
        assert not skipped, skipped  # no ack while Redis is away
        assert error_code(err) == "storage_unavailable" and err["correlation_id"] == "arq_b5", err
        assert err["payload"]["message"]
        assert {k: err["payload"][k] for k in ("room", "channel", "id")} == {
            "room": "science", "channel": "explore", "id": "arq_b5"}
        # Not delivered: a room-wide event (delivered at once) comes next.
        pub.send({"type": "event", "id": "arq_marker", "room": "science", "payload": {}})
        assert sub.recv_until(is_event)[0]["id"] == "arq_marker"
        m = server.metrics()
        assert (m["arqonbus_redis_held_total"], m["arqonbus_redis_held_messages"]) == (5, 5)
        assert m["arqonbus_redis_refused_total"] == 1
        assert m['arqonbus_errors_total{code="storage_unavailable"}'] == 1

        redis.start()
        wait_health(server, 200)
        acks = [pub.recv_until(is_ack)[0] for _ in range(5)]
        assert [a["correlation_id"] for a in acks] == ["arq_b%d" % i for i in range(5)]
        entries = redis.entries(CHANNEL)
        assert [f["id"] for _, f in entries] == ["arq_b%d" % i for i in range(5)]
        assert [a["payload"]["position"] for a in acks] == [sid for sid, _ in entries]
        assert [stored_as(e) for e in entries] == [dict(h, position=sid) for h, (sid, _) in zip(held, entries)]
        # The buffer is free again.
        positions = publish_acked(pub, ["arq_b6"])
        got = sub.recv_until(is_event)[0]
        assert (got["id"], got["position"]) == ("arq_b6", positions[0])
        assert server.metrics()["arqonbus_redis_refused_total"] == 1


def publish_then_kill(server, redis, sub, pub):
    """arq_h0..2 stored (delivered with positions), then Redis SIGKILLed and
    arq_h3..4 published (delivered here without position, held). Returns the
    five envelopes 'sub' received."""
    publish_acked(pub, ["arq_h%d" % i for i in range(3)])
    delivered = [sub.recv_until(is_event)[0] for _ in range(3)]
    assert all("position" in e for e in delivered)
    redis.kill()
    wait_health(server, 503)
    for i in range(3, 5):
        pub.send(event("arq_h%d" % i, i, ack=True))
        got = sub.recv_until(is_event)[0]
        assert got["id"] == "arq_h%d" % i and "position" not in got
        delivered.append(got)
    return delivered


def test_history_during_an_outage_comes_from_the_node(make_server, durable_redis):
    redis = durable_redis
    server = start(make_server, redis)
    with Bus(server.port, channel=CHANNEL) as sub, Bus(server.port) as pub:
        delivered = publish_then_kill(server, redis, sub, pub)
        # Answered, not an error: what this node delivered, as delivered.
        p = history(sub)
        assert p["messages"] == delivered and p["more"] is False
        p = history(sub, limit=2)
        assert p["messages"] == delivered[-2:] and p["more"] is True
        p = history(pub, since=delivered[0]["position"])
        assert p["messages"] == delivered[1:] and p["gap"] is False

        redis.restart()  # the AOF brings arq_h0..2 back
        wait_health(server, 200)
        acks = [pub.recv_until(is_ack)[0] for _ in range(2)]
        assert [a["correlation_id"] for a in acks] == ["arq_h3", "arq_h4"]
        stored = [stored_as(e) for e in redis.entries(CHANNEL)]
        assert ids(stored) == ["arq_h%d" % i for i in range(5)]
        assert history(sub)["messages"] == stored
        # The last position received before the messages without one: history
        # since it returns them again, now with their positions.
        p = history(sub, since=delivered[2]["position"])
        assert p["messages"] == stored[3:] and p["gap"] is False
        assert [m["position"] for m in p["messages"]] == [a["payload"]["position"] for a in acks]


def test_since_the_last_position_during_an_outage_returns_the_held_messages(make_server, redis):
    server = start(make_server, redis)
    with Bus(server.port, channel=CHANNEL) as sub, Bus(server.port) as pub:
        delivered = publish_then_kill(server, redis, sub, pub)
        # A client that resumes during the outage from the last position it
        # got (arq_h2's) missed arq_h3 and arq_h4, which came after it.
        p = history(pub, since=delivered[2]["position"])
        assert p["messages"] == delivered[3:] and p["gap"] is False
