"""Fan-out on the bus, and what happens to clients that cannot keep up.

Events published to a channel reach every member but the sender (unless it
connected with echo=true). With many members and several senders at once,
every member must receive every event exactly once, each sender's events in
the order they were sent, and the message counters must move by exactly what
was received and queued (delivered counts every envelope queued: welcomes,
notifications, replies, errors and events). A client that does not read is
closed as a slow consumer (1008 slow_consumer), by the outbound queue bound
or by the write timeout, without costing the healthy clients a single
message.

Members join through the initial-channel query parameter, so the joins are
over before any event is sent; each earlier member is told of each later
one (client_joined), and the tests read and check those notifications
before the traffic starts. Every envelope read is checked against the
published schema (wsutil.read_envelopes, envelopes.Bus).

The slow-consumer tests pace the sender: each round is read by every
healthy client before the next is sent, so only the client that does not
read can ever fill its queue. On loopback the kernel buffers megabytes for a
client that does not read, so the rounds go on until the server gives up on
it, with an upper bound on the bytes sent.
"""
import json
import threading
import time

import pytest

from conftest import SLOW
from envelopes import Bus, check, query
from rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, close_payload, frame, parse_close
from wsutil import connect_many, drain_to_end, frame_size, masked_frame, pop_frame, read_envelopes, type_deltas

RECEIVED = "arqonbus_messages_received_total"
DELIVERED = "arqonbus_messages_delivered_total"
SLOW_CLOSES = "arqonbus_slow_consumer_closes_total"
CLOSED_SLOW = 'arqonbus_connections_closed_total{reason="slow_consumer"}'
SENT_BYTES = "arqonbus_sent_bytes_total"
TINY_RCVBUF = 4096
MAX_SENT = 64 << 20  # bytes per client before a test gives up waiting for the slow-consumer close


def close_all(conns):
    for ws in conns:
        ws.close()


def expect_pong_next(conns, timeout):
    """Pings every connection and checks that the pong is the next frame it
    receives: nothing else was still queued to it."""
    for i, ws in enumerate(conns):
        ws.send_frame(OP_PING, b"end-%d" % i)
    for i, ws in enumerate(conns):
        ws.sock.settimeout(timeout)
        fin, op, payload = ws.recv_frame()
        assert (op, payload) == (OP_PONG, b"end-%d" % i), \
            "connection %d got an extra frame %r" % (i, (op, payload[:80]))


def event_text(payload):
    """A compact event for the sender's initial channel, as bytes."""
    return json.dumps({"type": "event", "payload": payload}, separators=(",", ":")).encode()


def is_event(env):
    return env["type"] == "event"


def is_welcome(env):
    return env["type"] == "system" and env["payload"].get("event") == "welcome"


def check_joined(env, room, channel, client_id, members):
    assert env["type"] == "system" and (env["room"], env["channel"]) == (room, channel), env
    p = env["payload"]
    assert (p["event"], p["client_id"], p["members"]) == ("client_joined", client_id, members), env


def check_left(env, room, channel, client_id, members):
    assert env["type"] == "system" and (env["room"], env["channel"]) == (room, channel), env
    p = env["payload"]
    assert (p["event"], p["client_id"], p["members"], p["reason"]) == \
        ("client_left", client_id, members, "disconnected"), env


def join_in_turn(port, channel, n, members=(), **params):
    """Connects 'n' Bus clients to 'channel' (room:channel, joined as the
    initial channel), one after the other. Each newcomer's welcome lists the
    channel, and every earlier member (those of 'members' first) reads the
    newcomer's client_joined with the right member count. Returns the new
    clients and the number of envelopes all of them read."""
    room, ch = channel.split(":")
    members, new, read = list(members), [], 0
    for _ in range(n):
        b = Bus(port, timeout=5 * SLOW, channel=channel, **params)
        assert b.welcome["payload"]["subscriptions"] == [channel], b.welcome
        read += 1
        for m in members:
            check_joined(m.recv(), room, ch, b.id, len(members) + 1)
            read += 1
        members.append(b)
        new.append(b)
    return new, read


# ---- fan-out --------------------------------------------------------------------

def check_joins(got, room, channel):
    """'got' is what each member of a channel read up to and including a
    first event: the welcome, then one client_joined for each member that
    joined after it. Checks that every member was told of exactly the later
    members, in order, all of them telling the same story. Returns the
    members' client ids."""
    n = len(got)
    ids, position, joiner = [], [], {}
    for i, envs in enumerate(got):
        w = envs[0]
        assert is_welcome(w), "connection %d: the first message is not the welcome: %r" % (i, w)
        assert w["payload"]["subscriptions"] == ["%s:%s" % (room, channel)], w
        ids.append(w["payload"]["client_id"])
        notes = envs[1:-1]
        # A member told of k later joins joined when the channel reached
        # n - k members, and then heard of members n-k+1 .. n.
        position.append(n - len(notes))
        for m, env in zip(range(position[-1] + 1, n + 1), notes):
            check_joined(env, room, channel, env["payload"]["client_id"], m)
            assert joiner.setdefault(m, env["payload"]["client_id"]) == env["payload"]["client_id"], \
                "two members were told of different joiners as member %d" % m
    assert len(set(ids)) == n, "two clients got the same client id"
    assert sorted(position) == list(range(1, n + 1)), "the members' join notifications do not add up: %r" % position
    for i, p in enumerate(position):
        if p > 1:
            assert joiner[p] == ids[i], "member %d was announced as %r, not %r" % (p, joiner[p], ids[i])
    return ids


def test_every_client_gets_every_message_once_in_sender_order(server):
    nclients, nsenders, per_sender = 50, 5, 40
    room, channel = "fan", "out"
    # Sender 0 asks for its own events back (echo=true); nobody else does.
    conns = connect_many(server.port, 1, timeout=10 * SLOW, path=query(channel="fan:out", echo=True))
    try:
        conns += connect_many(server.port, nclients - 1, timeout=10 * SLOW, path=query(channel="fan:out"))
        assert server.metrics()["arqonbus_connections"] == nclients
        senders = conns[:nsenders]
        # Every stored message carries its position in history, one sequence
        # for all channels, started from the server's start time: positions
        # of consecutive messages have the same number of digits, so the
        # frame sizes aimed at below do not depend on the order in which the
        # senders are routed.
        # Every client had joined before its 101 was sent, so a first event
        # from sender 0 comes after every notification to every member.
        conns[0].send_frame(OP_TEXT, event_text({"data": "probe"}))
        got = read_envelopes(conns, [1] * nclients, 10 * SLOW, counted=is_event, raw=True)
        ids = check_joins([[env for env, _ in envs] for envs in got], room, channel)
        probe_ids = set()
        for envs in got:
            probe = envs[-1][0]
            assert (probe["room"], probe["channel"], probe["from"], probe["payload"]) == \
                (room, channel, ids[0], {"data": "probe"}), probe
            probe_ids.add(probe["id"])
            assert probe["position"] == got[0][-1][0]["position"], probe
        assert len(probe_ids) == 1, "one event, several ids: %r" % probe_ids
        first = int(got[0][-1][0]["position"])
        # What the server adds around the data of an event from sender 0, in
        # bytes (its id and timestamp have fixed lengths, and so has its
        # position here).
        overhead = len(got[0][-1][1]) - len("probe")
        before = server.metrics()

        # Text and binary, and lengths on each side of the 7-bit and 16-bit
        # length encodings: of the frames clients send (the sizes below; 65535
        # and 65536 from sender 1) and of the frames the server sends (65535
        # and 65536 from sender 0). Binary messages are not envelopes: each
        # gets an unsupported_frame error to its sender and goes nowhere. All
        # that is sent to one client (about 420 KB) fits in its outbound queue
        # (1 MiB), so a client that the test reads late is never a slow
        # consumer.
        sizes = [60, 125, 126, 3000, 200, 1000]
        bare = len(event_text({"data": ""}))

        def message(s, seq):
            head = "%d:%d:" % (s, seq)
            if seq % 10 == 9:
                return OP_BINARY, (head + "binary").encode()
            if s == 0 and seq in (7, 8):
                n = 65535 + seq - 7 - overhead  # the frame the server sends
            elif s == 1 and seq in (7, 8):
                n = 65535 + seq - 7 - bare  # the frame the client sends
            else:
                n = sizes[seq % len(sizes)] - bare
            return OP_TEXT, event_text({"data": head + "." * (n - len(head))})

        datas = {(s, seq): json.loads(message(s, seq)[1])["payload"]["data"]
                 for s in range(nsenders) for seq in range(per_sender) if seq % 10 != 9}

        def data(s, seq):
            return datas[(s, seq)]

        routed = {s: [seq for seq in range(per_sender) if seq % 10 != 9] for s in range(nsenders)}
        nbinary = per_sender - len(routed[0])
        assert len(message(1, 7)[1]) == 65535 and len(message(1, 8)[1]) == 65536
        assert len(message(0, 1)[1]) == 125 and len(message(0, 2)[1]) == 126

        start = threading.Barrier(nsenders)
        errors = []

        def send(s):
            try:
                start.wait(10 * SLOW)
                for seq in range(per_sender):
                    senders[s].send_frame(*message(s, seq))
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=send, args=(s,)) for s in range(nsenders)]
        for t in threads:
            t.start()
        # Each client gets the events of every sender but itself (sender 0
        # its own too), and each sender an error per binary message.
        total = nsenders * len(routed[0])
        counts = [total + nbinary if i == 0 else total - len(routed[i]) + nbinary if i < nsenders else total
                  for i in range(nclients)]
        got = read_envelopes(conns, counts, 30 * SLOW, raw=True)
        for t in threads:
            t.join(10 * SLOW)
        assert not errors, errors
        sender_of = {ids[s]: s for s in range(nsenders)}
        position_of = {}
        for i, envs in enumerate(got):
            by_sender = {s: [] for s in range(nsenders)}
            mine = []  # what this client's own messages caused, in order
            for env, raw in envs:
                if env["type"] == "error":
                    assert i < nsenders, "client %d got an error: %r" % (i, env)
                    assert env["payload"]["code"] == "unsupported_frame", env
                    mine.append("error")
                    continue
                assert env["type"] == "event", "client %d got %r" % (i, env)
                assert (env["room"], env["channel"]) == (room, channel), env
                assert env["from"] in sender_of, "client %d got an event from a non-sender: %r" % (i, env)
                s = sender_of[env["from"]]
                by_sender[s].append(env["payload"])
                if s == i:
                    mine.append(env["payload"]["data"])
                if s == 0 and env["payload"]["data"] in (data(0, 7), data(0, 8)):
                    assert len(raw) == (65535 if env["payload"]["data"] == data(0, 7) else 65536), \
                        "the server's frame is not the size the test aimed for: %d" % len(raw)
            for s in range(nsenders):
                want = [] if s == i and i != 0 else [{"data": data(s, seq)} for seq in routed[s]]
                assert by_sender[s] == want, "client %d: sender %d's events differ" % (i, s)
            if i == 0:
                assert mine == ["error" if seq % 10 == 9 else data(0, seq) for seq in range(per_sender)]
            elif i < nsenders:
                assert mine == ["error"] * nbinary
            ids_seen = [env["id"] for env, _ in envs if env["type"] == "event"]
            assert len(set(ids_seen)) == len(ids_seen), "client %d got an event id twice" % i
            # Delivered in the order they were stored: positions grow, and
            # every client sees the same position for the same event.
            positions = [int(env["position"]) for env, _ in envs if env["type"] == "event"]
            assert positions == sorted(positions) and len(set(positions)) == len(positions), \
                "client %d: positions out of order: %r" % (i, positions)
            assert all(first < p <= first + total for p in positions), positions
            for env, raw in envs:
                if env["type"] == "event":
                    assert raw.endswith(b',"position":"%s"}' % env["position"].encode()), raw[-80:]
                    assert position_of.setdefault(env["id"], env["position"]) == env["position"], env
        expect_pong_next(conns, 5 * SLOW)
        after = server.metrics()
        # Received: every message, the binary ones as invalid. Delivered: the
        # events, and an error per binary message.
        nerrors = nsenders * nbinary
        assert type_deltas(before, after, RECEIVED) == {"event": nsenders * len(routed[0]), "invalid": nerrors}
        assert nsenders * len(routed[0]) + nerrors == nsenders * per_sender
        delivered = type_deltas(before, after, DELIVERED)
        assert delivered == {"event": sum(counts) - nerrors, "error": nerrors}, delivered
        assert sum(delivered.values()) == sum(counts) == sum(len(envs) for envs in got)
        assert sum(counts) == nclients * total - (nsenders - 1) * len(routed[0]) + nsenders * nbinary
        assert after[SLOW_CLOSES] == before[SLOW_CLOSES]
    finally:
        close_all(conns)
    server.wait_metric("arqonbus_connections", lambda v: v == 0)


def test_message_counters_follow_joins_and_leaves(server):
    """received counts the messages clients sent; delivered counts every
    envelope queued to a client: welcomes and notifications to the members
    of the moment (system), and each event once per member but its sender."""
    room, ch = "count", "c"
    before = server.metrics()
    read = 0  # envelopes the clients read; delivered must move by exactly this
    events = 0  # ... of which events; the rest are system envelopes

    def publish(sender, members, text):
        sender.send(event_text({"data": text}))
        others = [m for m in members if m is not sender]
        got = read_envelopes([m.ws for m in others], [1] * len(others), 5 * SLOW)
        for [env] in got:
            assert is_event(env) and (env["room"], env["channel"], env["from"]) == (room, ch, sender.id), env
            assert env["payload"] == {"data": text}, env
        return len(others)

    clients, n = join_in_turn(server.port, "count:c", 3)
    read += n
    try:
        assert read == 3 + (0 + 1 + 2)
        n = publish(clients[0], clients, "to two others")
        read, events = read + n, events + n
        more, n = join_in_turn(server.port, "count:c", 4, members=clients)
        clients += more
        read += n
        assert n == 4 + (3 + 4 + 5 + 6)
        n = publish(clients[1], clients, "to six others")
        read, events = read + n, events + n
        for gone in clients[:2]:
            gone.ws.send_frame(OP_CLOSE, close_payload(1000))
            gone.ws.sock.settimeout(5 * SLOW)
            fin, op, payload = gone.ws.recv_frame()  # nothing was queued before the close
            assert (op, parse_close(payload)) == (OP_CLOSE, (1000, b""))
            gone.ws.wait_eof(5 * SLOW)
            gone.close()
            clients.remove(gone)
            for m in clients:
                check_left(m.recv(), room, ch, gone.id, len(clients))
                read += 1
        server.wait_metric("arqonbus_connections", lambda v: v == 5)
        n = publish(clients[0], clients, "to four others")
        read, events = read + n, events + n
        expect_pong_next([m.ws for m in clients], 5 * SLOW)
        after = server.metrics()
        assert type_deltas(before, after, RECEIVED) == {"event": 3}
        assert read == 6 + 2 + 22 + 6 + (6 + 5) + 4
        assert events == 2 + 6 + 4
        assert type_deltas(before, after, DELIVERED) == {"system": read - events, "event": events}
    finally:
        close_all(clients)


# ---- slow consumers -------------------------------------------------------------

class PacedRounds:
    """One sender (a Bus) publishing rounds of 'per_round' events of about
    'size' bytes to its initial channel, each round read in full by every
    reader (RawWS connections) before the next. Envelopes other than the events (notifications) are kept per
    reader in 'notes'; 'read_bytes' counts the bytes of every frame the
    readers read."""

    def __init__(self, sender, readers, per_round, size):
        self.sender, self.per_round, self.size = sender, per_round, size
        self.room, self.channel = sender.welcome["payload"]["subscriptions"][0].split(":")
        self.rounds = 0
        self.read_bytes = 0
        self.set_readers(readers)

    def set_readers(self, readers):
        self.readers = readers
        self.notes = [[] for _ in readers]

    def payload(self, i):
        return {"seq": i, "data": "%08d:" % i + chr(97 + i % 26) * (self.size - 9)}

    def check_event(self, env, i):
        assert is_event(env), env
        assert (env["from"], env["room"], env["channel"]) == (self.sender.id, self.room, self.channel), env
        assert env["payload"] == self.payload(i), "event %r is not message %d" % (env["payload"].get("seq"), i)

    def round(self):
        first = self.rounds * self.per_round
        data = b"".join(frame(OP_TEXT, event_text(self.payload(first + k))) for k in range(self.per_round))
        self.sender.ws.send(data)
        got = read_envelopes(self.readers, [self.per_round] * len(self.readers), 10 * SLOW,
                             counted=is_event, raw=True)
        for i, envs in enumerate(got):
            events = [env for env, _ in envs if is_event(env)]
            for k, env in enumerate(events):
                self.check_event(env, first + k)
            self.notes[i] += [env for env, _ in envs if not is_event(env)]
            self.read_bytes += sum(frame_size(len(raw)) for _, raw in envs)
        self.rounds += 1

    @property
    def sent(self):
        return self.rounds * self.per_round

    def bytes_per_client(self):
        return self.read_bytes // len(self.readers)

    def check_stream(self, messages, first=0, welcome=False):
        """'messages' (raw frames) are, after the welcome when 'welcome', the
        events 'first', 'first'+1, ... in order, nothing missing. Returns the
        number of events."""
        envs = []
        for op, payload in messages:
            assert op == OP_TEXT, "opcode %r: %r" % (op, payload[:80])
            envs.append(check(payload))
        if welcome and envs:
            assert is_welcome(envs[0]), envs[0]
            envs = envs[1:]
        for j, env in enumerate(envs):
            self.check_event(env, first + j)
        return len(envs)


def check_stream_end(paced, slow, first, timeout, welcome=False):
    """Reads what 'slow' can still read: (its welcome, when 'welcome', then)
    the events from 'first' on with none missing, then the end of the
    connection. Returns (close payload or None, bytes of a frame cut
    short)."""
    messages, close, rest = drain_to_end(slow, timeout)
    n = paced.check_stream(messages, first, welcome)
    assert first + n < paced.sent, "the slow client got every message"
    return close, rest


def check_told_of_slow_close(paced, slow_id, members_after):
    """Every reader was told once that the slow client left, and nothing else."""
    for i, notes in enumerate(paced.notes):
        assert len(notes) == 1, "reader %d: %r" % (i, notes)
        check_left(notes[0], paced.room, paced.channel, slow_id, members_after)


@pytest.mark.parametrize("reads_after_close", [False, True], ids=["never-reads", "reads-after-close"])
def test_slow_consumer_over_the_queue_bound(make_server, reads_after_close):
    # close_timeout decides whether the client can still get the close frame:
    # 1 s drops it before it reads; 30 s waits for it.
    server = make_server(args=["--max-outbound-queue", "65536", "--write-timeout", "60s",
                               "--close-timeout", "30s" if reads_after_close else "1s"])
    before = server.metrics()
    members, _ = join_in_turn(server.port, "slow:q", 5)
    sender, healthy = members[0], members[1:]
    slow = connect_many(server.port, 1, rcvbuf=TINY_RCVBUF, path=query(channel="slow:q"))[0]
    try:
        # The slow client joined last: everyone else is told.
        joined = [m.recv() for m in members]
        slow_id = joined[0]["payload"]["client_id"]
        for env in joined:
            check_joined(env, "slow", "q", slow_id, 6)
        # Two events of about 12,000 bytes a round: a healthy client's queue
        # never holds more than two rounds, well under the 64 KiB bound.
        paced = PacedRounds(sender, [m.ws for m in healthy], per_round=2, size=12000)
        while server.metrics()[SLOW_CLOSES] == before[SLOW_CLOSES]:
            assert paced.bytes_per_client() < MAX_SENT, "no slow-consumer close after %d bytes" % MAX_SENT
            for _ in range(8):
                paced.round()
        # Healthy clients keep getting everything after the close, and are
        # told that the slow client left.
        for _ in range(4):
            paced.round()
        check_told_of_slow_close(paced, slow_id, 5)
        check_left(sender.recv(), "slow", "q", slow_id, 5)
        assert server.metrics()[SLOW_CLOSES] == before[SLOW_CLOSES] + 1
        if reads_after_close:
            # What was being written arrives, then the close frame, then EOF.
            close, rest = check_stream_end(paced, slow, 0, 10 * SLOW, welcome=True)
            assert parse_close(close) == (1008, b"slow_consumer")
            assert rest == b""
            slow.close()
            server.wait_metric("arqonbus_connections", lambda v: v == 5)
        else:
            # The client never reads: the server gives up on the close
            # handshake after close_timeout and drops the connection.
            server.wait_metric("arqonbus_connections", lambda v: v == 5, timeout=1 + 3)
            # The kernel still delivers what the server had written: a gapless
            # prefix of the stream, perhaps cut inside a frame, then the end.
            close, rest = check_stream_end(paced, slow, 0, 10 * SLOW, welcome=True)
            if close is not None:
                assert parse_close(close) == (1008, b"slow_consumer")
        after = server.metrics()
        assert after[SLOW_CLOSES] == before[SLOW_CLOSES] + 1
        assert after[CLOSED_SLOW] == before[CLOSED_SLOW] + 1
        assert type_deltas(before, after, RECEIVED) == {"event": paced.sent}
        # Nothing else is queued to anyone; the sender never got its own events.
        expect_pong_next([m.ws for m in members], 5 * SLOW)
    finally:
        close_all(members + [slow])


def test_write_that_makes_no_progress_is_closed_after_write_timeout(make_server):
    # The queue bound is as large as allowed, so only the write timeout can
    # close the client.
    server = make_server(args=["--write-timeout", "1s", "--max-outbound-queue", "1GiB", "--close-timeout", "30s"])
    members, _ = join_in_turn(server.port, "stall:w", 3)
    sender, healthy = members[0], members[1:]
    stalled = connect_many(server.port, 1, rcvbuf=TINY_RCVBUF, path=query(channel="stall:w"))[0]
    try:
        [[w]] = read_envelopes([stalled], [1], 5 * SLOW)
        assert is_welcome(w), w
        stalled_id = w["payload"]["client_id"]
        for m in members:
            check_joined(m.recv(), "stall", "w", stalled_id, 4)
        paced = PacedRounds(sender, [m.ws for m in healthy] + [stalled], per_round=4, size=16000)
        paced.round()  # the stalled client reads this round, then stops reading
        paced.set_readers([m.ws for m in healthy])
        before = server.metrics()
        base = paced.read_bytes
        # Send until the server can write nothing more to the stalled client
        # (its share of the bytes sent stops growing), then stop. On a slow
        # machine the write timeout may strike before that is seen.
        last, unchanged = None, 0
        while unchanged < 2:
            assert paced.bytes_per_client() < MAX_SENT, "writes to the stalled client never stalled"
            for _ in range(4):
                paced.round()
            m = server.metrics()
            if m[SLOW_CLOSES] != before[SLOW_CLOSES]:
                break
            # The sender gets nothing back, so what was not written to the
            # healthy clients (all of which they read) went to the stalled one.
            stalled_bytes = m[SENT_BYTES] - before[SENT_BYTES] - (paced.read_bytes - base)
            unchanged = unchanged + 1 if stalled_bytes == last else 0
            last = stalled_bytes
        # Closed within write_timeout (1 s, checked every 100 ms) and some slack.
        server.wait_metric(SLOW_CLOSES, lambda v: v == before[SLOW_CLOSES] + 1, timeout=1 + 3)
        paced.round()  # the healthy clients are unaffected, and told it left
        check_told_of_slow_close(paced, stalled_id, 3)
        check_left(sender.recv(), "stall", "w", stalled_id, 3)
        # Reading again, the client gets what was being written, then the
        # close frame and the end of the connection.
        close, rest = check_stream_end(paced, stalled, paced.per_round, 10 * SLOW)
        assert parse_close(close) == (1008, b"slow_consumer")
        assert rest == b""
        stalled.close()
        server.wait_metric(CLOSED_SLOW, lambda v: v == before[CLOSED_SLOW] + 1)
        server.wait_metric("arqonbus_connections", lambda v: v == 3)
        assert server.metrics()[SLOW_CLOSES] == before[SLOW_CLOSES] + 1
        expect_pong_next([m.ws for m in members], 5 * SLOW)
    finally:
        close_all(members + [stalled])


def test_a_long_write_to_a_steady_reader_is_not_a_stall(make_server):
    # One 24 MiB event to a client that reads about 5 MB/s takes about 5 s to
    # write, longer than write_timeout (2 s), but it keeps making progress: the
    # client must get the whole message and not be closed. (The server sees
    # progress only when the kernel takes more of the write, which it does
    # once a third of the socket's send buffer, up to 4 MB, has drained: a
    # reader much slower than that buffer per write_timeout is closed although
    # it keeps reading. That is why the reader is not slower.)
    server = make_server(args=["--write-timeout", "2s", "--max-message-size", "32MiB",
                               "--max-envelope-size", "32MiB", "--max-outbound-queue", "64MiB"])
    (reader, sender), _ = join_in_turn(server.port, "long:w", 2)
    try:
        data = "x" * (24 << 20)
        before = server.metrics()
        sender.ws.send(masked_frame(OP_TEXT, event_text({"data": data})))
        ws = reader.ws
        ws.sock.settimeout(5 * SLOW)
        received, first, still_writing = len(ws.buf), None, None
        while True:
            f = pop_frame(ws)
            if f is not None:
                break
            chunk = ws.sock.recv(250000)
            assert chunk, "the connection ended after %d bytes" % received
            ws.buf += chunk
            received += len(chunk)
            now = time.monotonic()
            first = first or now
            if still_writing is None and now - first > 2.2:
                # Longer than write_timeout after it began, the write is not
                # over yet (the bytes of a write are counted when it ends).
                still_writing = server.metrics()[SENT_BYTES] - before[SENT_BYTES] < 24 << 20
            time.sleep(0.05)
        fin, op, payload = f
        assert (fin, op) == (True, OP_TEXT)
        assert received == frame_size(len(payload)) and ws.buf == b"", "more than the one event arrived"
        assert still_writing, "the kernel took the whole write at once: the test did not test a long write"
        env = check(payload)
        assert is_event(env) and env["from"] == sender.id and env["payload"] == {"data": data}
        assert server.metrics()[SLOW_CLOSES] == 0
        # Still open, nothing else queued; the sender did not get its own event.
        expect_pong_next([reader.ws, sender.ws], 5 * SLOW)
    finally:
        close_all([reader, sender])
