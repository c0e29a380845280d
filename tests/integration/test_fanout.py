"""Fan-out on the bus, and what happens to clients that cannot keep up.

Under the interim routing every data message goes to every bus client, the
sender included. With many clients and several senders at once, every client
must receive every message exactly once, each sender's messages in the order
they were sent, and the message counters must move by exactly what was sent
and queued. A client that does not read is closed as a slow consumer (1008
slow_consumer), by the outbound queue bound or by the write timeout, without
costing the healthy clients a single message.

The slow-consumer tests pace the senders: each round is read by every
healthy client before the next is sent, so only the client that does not
read can ever fill its queue. On loopback the kernel buffers megabytes for a
client that does not read, so the rounds go on until the server gives up on
it, with an upper bound on the bytes sent.
"""
import struct
import threading
import time

import pytest

from conftest import SLOW
from rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, close_payload, frame, parse_close
from wsutil import connect_many, drain_to_end, frame_size, read_messages

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
        assert (op, payload) == (OP_PONG, b"end-%d" % i), "connection %d got an extra frame %r" % (i, (op, payload[:40]))


# ---- fan-out --------------------------------------------------------------------

def test_every_client_gets_every_message_once_in_sender_order(server):
    nclients, nsenders, per_sender = 50, 5, 40
    before = server.metrics()
    conns = connect_many(server.port, nclients, timeout=10 * SLOW)
    try:
        assert server.metrics()["arqonbus_connections"] == nclients
        senders = conns[:nsenders]
        # Text and binary, and payload lengths on each side of the 7-bit and
        # 16-bit length encodings. All that is sent to one client (about
        # 280 KB) fits in its outbound queue (1 MiB), so a client that the
        # test reads late is never a slow consumer.
        sizes = [5, 125, 126, 3000, 200, 1000]

        def message(s, seq):
            head = b"%d:%d:" % (s, seq)
            size = 65535 + seq - 7 if s == 0 and seq in (7, 8) else sizes[seq % len(sizes)]
            body = head + b"." * (size - len(head))
            return (OP_TEXT if seq % 2 == 0 else OP_BINARY), body

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
        total = nsenders * per_sender
        got = read_messages(conns, [total] * nclients, 30 * SLOW)
        for t in threads:
            t.join(10 * SLOW)
        assert not errors, errors
        expected = {s: [message(s, seq) for seq in range(per_sender)] for s in range(nsenders)}
        for i, msgs in enumerate(got):
            by_sender = {s: [] for s in range(nsenders)}
            for op, payload in msgs:
                by_sender[int(payload.split(b":", 1)[0])].append((op, payload))
            for s in range(nsenders):
                assert by_sender[s] == expected[s], "client %d: sender %d's messages differ" % (i, s)
        expect_pong_next(conns, 5 * SLOW)
        after = server.metrics()
        assert after[RECEIVED] - before[RECEIVED] == total
        assert after[DELIVERED] - before[DELIVERED] == total * nclients
        assert after[SLOW_CLOSES] == before[SLOW_CLOSES]
    finally:
        close_all(conns)
    server.wait_metric("arqonbus_connections", lambda v: v == 0)


def test_message_counters_follow_joins_and_leaves(server):
    """delivered counts the clients open when each message was routed."""
    before = server.metrics()
    first = connect_many(server.port, 3)
    try:
        first[0].send_frame(OP_TEXT, "to three")
        read_messages(first, [1] * 3, 5 * SLOW)
        more = connect_many(server.port, 4)
        first += more
        first[1].send_frame(OP_BINARY, b"to seven")
        got = read_messages(first, [1] * 7, 5 * SLOW)
        assert got == [[(OP_BINARY, b"to seven")]] * 7
        for ws in first[:2]:
            ws.send_frame(OP_CLOSE, close_payload(1000))
            assert ws.expect_close(5 * SLOW) == (1000, "")
            ws.wait_eof(5 * SLOW)
            ws.close()
        server.wait_metric("arqonbus_connections", lambda v: v == 5)
        first[2].send_frame(OP_TEXT, "to five")
        got = read_messages(first[2:], [1] * 5, 5 * SLOW)
        assert got == [[(OP_TEXT, b"to five")]] * 5
        after = server.metrics()
        assert after[RECEIVED] - before[RECEIVED] == 3
        assert after[DELIVERED] - before[DELIVERED] == 3 + 7 + 5
    finally:
        close_all(first)


# ---- slow consumers -------------------------------------------------------------

class PacedRounds:
    """One sender publishing rounds of 'per_round' binary messages of 'size'
    bytes, each round read in full by every healthy client before the next."""

    def __init__(self, server, healthy, per_round, size):
        self.server, self.healthy = server, healthy
        self.per_round, self.size = per_round, size
        self.rounds = 0

    def message(self, i):
        return struct.pack("!I", i) + bytes([i % 251]) * (self.size - 4)

    def round(self):
        first = self.rounds * self.per_round
        data = b"".join(frame(OP_BINARY, self.message(first + k)) for k in range(self.per_round))
        self.healthy[0].send(data)
        got = read_messages(self.healthy, [self.per_round] * len(self.healthy), 10 * SLOW)
        want = [(OP_BINARY, self.message(first + k)) for k in range(self.per_round)]
        for i, msgs in enumerate(got):
            assert msgs == want, "healthy client %d missed or reordered messages in round %d" % (i, self.rounds)
        self.rounds += 1

    @property
    def sent(self):
        return self.rounds * self.per_round

    def bytes_per_client(self):
        return self.sent * frame_size(self.size)

    def check_prefix(self, messages, first=0):
        """'messages' are the messages 'first', 'first'+1, ... in order, nothing missing."""
        for j, (op, payload) in enumerate(messages):
            assert (op, payload) == (OP_BINARY, self.message(first + j)), \
                "message %d is not the next one sent" % (first + j)


def check_stream_end(paced, slow, first, timeout):
    """Reads what 'slow' can still read: the messages from 'first' on with
    none missing, then the end of the connection. Returns (messages, close
    payload or None, bytes of a frame cut short)."""
    messages, close, rest = drain_to_end(slow, timeout)
    paced.check_prefix(messages, first)
    assert first + len(messages) < paced.sent, "the slow client got every message"
    return messages, close, rest


@pytest.mark.parametrize("reads_after_close", [False, True], ids=["never-reads", "reads-after-close"])
def test_slow_consumer_over_the_queue_bound(make_server, reads_after_close):
    # close_timeout decides whether the client can still get the close frame:
    # 1 s drops it before it reads; 30 s waits for it.
    server = make_server(args=["--max-outbound-queue", "65536", "--write-timeout", "60s",
                               "--close-timeout", "30s" if reads_after_close else "1s"])
    before = server.metrics()
    healthy = connect_many(server.port, 4)
    slow = connect_many(server.port, 1, rcvbuf=TINY_RCVBUF)[0]
    try:
        # Two 12,000-byte messages a round: a healthy client's queue never
        # holds more than two rounds, well under the 64 KiB bound.
        paced = PacedRounds(server, healthy, per_round=2, size=12000)
        while server.metrics()[SLOW_CLOSES] == before[SLOW_CLOSES]:
            assert paced.bytes_per_client() < MAX_SENT, "no slow-consumer close after %d bytes" % MAX_SENT
            for _ in range(8):
                paced.round()
        # Healthy clients keep getting everything after the close.
        for _ in range(4):
            paced.round()
        assert server.metrics()[SLOW_CLOSES] == before[SLOW_CLOSES] + 1
        if reads_after_close:
            # What was being written arrives, then the close frame, then EOF.
            messages, close, rest = check_stream_end(paced, slow, 0, 10 * SLOW)
            assert parse_close(close) == (1008, b"slow_consumer")
            assert rest == b""
            slow.close()
            server.wait_metric("arqonbus_connections", lambda v: v == 4)
        else:
            # The client never reads: the server gives up on the close
            # handshake after close_timeout and drops the connection.
            server.wait_metric("arqonbus_connections", lambda v: v == 4, timeout=1 + 3)
            # The kernel still delivers what the server had written: a gapless
            # prefix of the messages, perhaps cut inside a frame, then the end.
            messages, close, rest = check_stream_end(paced, slow, 0, 10 * SLOW)
            if close is not None:
                assert parse_close(close) == (1008, b"slow_consumer")
        after = server.metrics()
        assert after[SLOW_CLOSES] == before[SLOW_CLOSES] + 1
        assert after[CLOSED_SLOW] == before[CLOSED_SLOW] + 1
        assert after[RECEIVED] - before[RECEIVED] == paced.sent
        expect_pong_next(healthy, 5 * SLOW)
    finally:
        close_all(healthy + [slow])


def test_write_that_makes_no_progress_is_closed_after_write_timeout(make_server):
    # The queue bound is as large as allowed, so only the write timeout can
    # close the client.
    server = make_server(args=["--write-timeout", "1s", "--max-outbound-queue", "1GiB", "--close-timeout", "30s"])
    healthy = connect_many(server.port, 2)
    stalled = connect_many(server.port, 1, rcvbuf=TINY_RCVBUF)[0]
    conns = healthy + [stalled]
    try:
        paced = PacedRounds(server, conns, per_round=4, size=16000)
        paced.round()  # the stalled client reads this round, then stops reading
        paced.healthy = healthy
        before = server.metrics()
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
            healthy_bytes = len(healthy) * (paced.sent - paced.per_round) * frame_size(paced.size)
            stalled_bytes = m[SENT_BYTES] - before[SENT_BYTES] - healthy_bytes
            unchanged = unchanged + 1 if stalled_bytes == last else 0
            last = stalled_bytes
        # Closed within write_timeout (1 s, checked every 100 ms) and some slack.
        server.wait_metric(SLOW_CLOSES, lambda v: v == before[SLOW_CLOSES] + 1, timeout=1 + 3)
        paced.round()  # the healthy clients are unaffected
        # Reading again, the client gets what was being written, then the
        # close frame and the end of the connection.
        messages, close, rest = check_stream_end(paced, stalled, paced.per_round, 10 * SLOW)
        assert parse_close(close) == (1008, b"slow_consumer")
        assert rest == b""
        stalled.close()
        server.wait_metric(CLOSED_SLOW, lambda v: v == before[CLOSED_SLOW] + 1)
        server.wait_metric("arqonbus_connections", lambda v: v == 2)
        assert server.metrics()[SLOW_CLOSES] == before[SLOW_CLOSES] + 1
    finally:
        close_all(conns)


def test_a_long_write_to_a_steady_reader_is_not_a_stall(make_server):
    # One 4 MiB message to a client that reads about 1 MB/s takes about 4 s to
    # write, longer than write_timeout, but it keeps making progress: the
    # client must get the whole message and not be closed.
    server = make_server(args=["--write-timeout", "1s", "--max-message-size", "16MiB",
                               "--max-outbound-queue", "64MiB"])
    reader, sender = connect_many(server.port, 2)
    try:
        size = 4 << 20
        # The sender gets its own copy too: it reads it at full speed.
        threading.Thread(target=drain_to_end, args=(sender, 30 * SLOW), daemon=True).start()
        sender.send_frame(OP_BINARY, b"x" * size)
        expected = frame_size(size)
        reader.sock.settimeout(5 * SLOW)
        got = bytearray()
        while len(got) < expected:
            chunk = reader.sock.recv(50000)
            assert chunk, "the connection ended after %d of %d bytes" % (len(got), expected)
            got += chunk
            time.sleep(0.05)
        assert len(got) == expected
        assert server.metrics()["arqonbus_slow_consumer_closes_total"] == 0
    finally:
        close_all([reader, sender])
