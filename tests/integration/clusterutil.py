"""Helpers for the several-node tests (test_cluster.py).

A bus of several arqonbus processes shares one Redis (or several, as
shards). These helpers read many client connections, on several nodes, at
once (Reader), publish from background threads while the connections are
read (Publisher), wait until every channel reader of every node reads a
channel (sync_channels), and check what each subscriber received against
what was published and against the channel's stream in Redis
(check_channel_delivery). Every envelope a connection receives is checked
against the published schema (envelopes.check) as it is read.

Positions are Redis stream ids "ms-seq": they are compared as (ms, seq)
integer pairs (pos_key), never as strings.
"""
import json
import selectors
import threading
import time

from conftest import SLOW
from envelopes import Bus, check
from rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, parse_close
from wsutil import pop_frame


def pos_key(position):
    """A stream id "ms-seq" as a tuple that sorts like the stream."""
    ms, sep, seq = position.partition("-")
    assert sep and ms.isdigit() and seq.isdigit(), "not a stream id: %r" % position
    return int(ms), int(seq)


def split(channel):
    room, _, ch = channel.partition(":")
    return room, ch


def stream_key(channel):
    room, ch = split(channel)
    return "arqon:room:%s:channel:%s" % (room, ch)


def fnv1a32(text):
    h = 2166136261
    for b in text.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def http_json(node, path):
    status, _, body = node.http(path)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def wait_health(node, timeout=10):
    deadline = time.monotonic() + timeout * SLOW
    last = None
    while time.monotonic() < deadline:
        status, _, body = node.http("/health")
        last = (status, body)
        if status == 200:
            body = json.loads(body)
            assert body["status"] == "ok" and body["storage"] == "redis", body
            return body
        time.sleep(0.05)
    raise AssertionError("node on port %d never became healthy: %r" % (node.port, last))


def wait_until(probe, timeout, what):
    """Calls probe() until it returns a true value, which is returned. On
    the deadline, fails with 'what' and the last value probe() returned."""
    deadline = time.monotonic() + timeout * SLOW
    last = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError("%s (waited %.1f s); last seen: %r" % (what, timeout * SLOW, last))
        time.sleep(0.1)


def is_event(env):
    return env["type"] == "event"


def is_notification(env):
    return env["type"] == "system" and env["payload"].get("event") in ("client_joined", "client_left",
                                                                       "channel_created")


class Reader:
    """Reads a set of Bus connections at once with a selector. received[name]
    is every envelope connection 'name' got since it was added, in order,
    each checked against the schema. A close frame or the end of a
    connection fails the read, except for the names in 'ended', which are
    expected to be cut off (their end is recorded in closed[name])."""

    def __init__(self):
        self.buses = {}
        self.received = {}
        self.closed = {}
        self.ended = set()
        self.run_count = {}

    def add(self, name, bus):
        self.buses[name] = bus
        self.received[name] = []
        self.run_count[name] = 0

    def remove(self, name):
        self.buses.pop(name)

    def _drain(self, name):
        """Moves every whole frame buffered for 'name' to received[name]."""
        ws = self.buses[name].ws
        while name not in self.closed:
            f = pop_frame(ws)
            if f is None:
                return
            fin, op, payload = f
            if op in (OP_PING, OP_PONG):
                continue
            if op == OP_CLOSE:
                self.closed[name] = parse_close(payload)
                if name not in self.ended:
                    raise AssertionError("%s was closed by the server with %r after %d envelopes"
                                         % (name, self.closed[name], len(self.received[name])))
                return
            assert fin, "the server fragmented a message to %s" % name
            assert op == OP_TEXT, "%s got opcode %r: %r" % (name, op, payload[:200])
            env = check(payload)
            self.received[name].append(env)
            if env["type"] == "event" and "j" in env["payload"]:
                self.run_count[name] += 1

    def pump(self, done, timeout, what, fail=True):
        """Reads every connection until done() holds; returns True. When it
        does not within 'timeout' seconds (times SLOW): fails with 'what'
        and done's progress report, or returns False when not 'fail'.
        done() returns True, or something that says how far it got."""
        deadline = time.monotonic() + timeout * SLOW
        sel = selectors.DefaultSelector()
        try:
            for name, bus in self.buses.items():
                self._drain(name)
                if name not in self.closed:
                    sel.register(bus.ws.sock, selectors.EVENT_READ, name)
            while True:
                progress = done()
                if progress is True:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    if fail:
                        raise AssertionError("%s: not within %.1f s; %s" % (what, timeout * SLOW, progress))
                    return False
                for key, _ in sel.select(min(left, 0.2)):
                    name = key.data
                    ws = self.buses[name].ws
                    try:
                        chunk = ws.sock.recv(1 << 20)
                    except (ConnectionResetError, BrokenPipeError):
                        chunk = b""
                    if chunk:
                        ws.buf += chunk
                        self._drain(name)
                    elif name in self.ended:
                        self.closed.setdefault(name, "end of stream")
                    else:
                        raise AssertionError("%s: the server ended the connection after %d envelopes"
                                             % (name, len(self.received[name])))
                    if name in self.closed:
                        sel.unregister(key.fileobj)
        finally:
            sel.close()

    def settle(self, quiet=0.3):
        """Reads for 'quiet' seconds: whatever is still on its way arrives."""
        self.pump(lambda: "settling", quiet / SLOW, "settle", fail=False)

    def events(self, name, run=True):
        """The events 'name' received; with 'run', only those of the
        measured run (payload has "j"), without the sync events."""
        return [e for e in self.received[name] if is_event(e) and (not run or "j" in e["payload"])]


class Publisher(threading.Thread):
    """Sends the envelopes of 'items' on 'bus' from a thread, pausing
    'pause' seconds after each 'every' of them. An error is kept in .error
    (and raised by finish()) unless 'cut' is set: the bus's node is being
    killed and the send may fail."""

    def __init__(self, bus, items, pause=0.0, every=1):
        super().__init__(daemon=True)
        self.bus, self.items, self.pause, self.every = bus, list(items), pause, every
        self.sent = []
        self.error = None
        self.cut = False

    def run(self):
        try:
            for k, env in enumerate(self.items):
                self.bus.send(env)
                self.sent.append(env["id"])
                if self.pause and (k + 1) % self.every == 0:
                    time.sleep(self.pause)
        except OSError as e:
            self.error = e

    def finish(self, timeout=60):
        self.join(timeout * SLOW)
        assert not self.is_alive(), "publisher %s is still sending" % self.bus.id
        if self.error is not None and not self.cut:
            raise AssertionError("publisher %s failed after %d sends: %r"
                                 % (self.bus.id, len(self.sent), self.error))


def run_event(channel, mid, pub, j):
    room, ch = split(channel)
    return {"type": "event", "id": mid, "room": room, "channel": ch, "payload": {"pub": pub, "j": j}}


def sync_channels(reader, syncer, members, timeout=15):
    """Publishes sync events from the client 'syncer' (a member of none of
    the channels) to every channel of 'members' ({channel: [reader names]})
    until every member has received one. A member receives the messages
    stored after its node began reading the channel; a message stored after
    a sync event its node delivered reaches it for sure."""
    deadline = time.monotonic() + timeout * SLOW
    k = 0

    def synced(name, channel):
        room, ch = split(channel)
        return any(e["type"] == "event" and "sync" in e["payload"] and (e["room"], e["channel"]) == (room, ch)
                   for e in reader.received[name])

    def missing():
        return [(n, c) for c, names in members.items() for n in names if not synced(n, c)]

    while missing():
        assert time.monotonic() < deadline, "sync events never reached %r" % missing()
        for channel in members:
            room, ch = split(channel)
            k += 1
            syncer.send({"type": "event", "id": "arq_sync%d" % k, "room": room, "channel": ch,
                         "payload": {"sync": k}})
        reader.pump(lambda: not missing() or "missing %r" % missing(), 0.5, "sync", fail=False)


def connect(node, name, channels=(), **params):
    """A Bus on 'node' with client id 'name', joined to 'channels' (the
    first one as its initial channel, the others with join_channel)."""
    channels = list(channels)
    bus = Bus(node.port, timeout=10 * SLOW, client_id=name, channel=channels[0] if channels else None, **params)
    assert bus.id == name, bus.welcome
    for channel in channels[1:]:
        bus.join(channel)
        for env in bus.skipped:  # notifications that arrived before the reply
            assert is_notification(env), env
    return bus


def check_only_expected(reader, name, channels):
    """Everything 'name' received is an event of one of its 'channels' (no
    cross-talk), or a membership notification of one of them."""
    mine = {split(c) for c in channels}
    for env in reader.received[name]:
        if is_event(env):
            assert (env["room"], env.get("channel")) in mine, "%s got an event of another channel: %r" % (name, env)
        else:
            assert is_notification(env), "%s got an unexpected envelope: %r" % (name, env)
            assert (env["room"], env["channel"]) in mine, "%s: %r" % (name, env)


def channel_sequence(reader, name, channel):
    """The events 'name' received on 'channel', in order, with sync events."""
    room, ch = split(channel)
    return [e for e in reader.received[name] if is_event(e) and (e["room"], e["channel"]) == (room, ch)]


def check_channel_delivery(reader, name, channel, expected_ids, stream, sent):
    """Checks what 'name' received on 'channel':
    - every id of 'expected_ids' exactly once and nothing else of the run;
    - positions strictly increasing (stream order);
    - each event exactly as the stream entry with its id: same position,
      same order as in 'stream' (the channel's XRANGE, [(id, fields)]);
    - each run event as its publisher sent it ('sent': {id: envelope})."""
    seq = channel_sequence(reader, name, channel)
    ids = [e["id"] for e in seq]
    assert len(ids) == len(set(ids)), "%s got duplicates on %s: %r" % (
        name, channel, sorted({i for i in ids if ids.count(i) > 1})[:10])
    run_ids = [e["id"] for e in seq if "j" in e["payload"]]
    missing = set(expected_ids) - set(run_ids)
    extra = set(run_ids) - set(expected_ids)
    assert not missing and not extra, "%s on %s: %d missing (e.g. %r), %d unexpected (e.g. %r)" % (
        name, channel, len(missing), sorted(missing)[:5], len(extra), sorted(extra)[:5])
    keys = [pos_key(e["position"]) for e in seq]
    assert all(a < b for a, b in zip(keys, keys[1:])), "%s: positions on %s not increasing: %r" % (
        name, channel, [e["position"] for e in seq][:50])
    by_id = {fields["id"]: sid for sid, fields in stream}
    order = [fields["id"] for sid, fields in stream]
    index = {mid: k for k, mid in enumerate(order)}
    for e in seq:
        assert by_id.get(e["id"]) == e["position"], "%s: %s delivered at %s, stored at %r" % (
            name, e["id"], e["position"], by_id.get(e["id"]))
        assert list(e)[-1] == "position", e
        if e["id"] in sent:
            want = sent[e["id"]]
            assert (e["from"], e["payload"]) == (want["from"], want["payload"]), (name, e, want)
    # The same order as the stream: the run events it got, in stream order,
    # leave out exactly the ones it should not get.
    want_order = [mid for mid in order if mid in set(expected_ids)]
    assert run_ids == want_order, "%s: order on %s differs from the stream" % (name, channel)
    assert [index[mid] for mid in ids] == sorted(index[mid] for mid in ids)
