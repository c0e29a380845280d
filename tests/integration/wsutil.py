"""Helpers for the client, fan-out, ops and process tests.

rawws.RawWS reads one connection at a time and blocks; fan-out tests need to
read many connections at once without letting any of them fall behind, so
this module parses server frames out of a RawWS's buffer without blocking
and reads a set of connections together with a selector: read_messages
returns the raw data messages, read_envelopes the protocol v1 envelopes,
each checked against the published schema (envelopes.check). It also has a
one-shot raw HTTP client for the ops port (urllib cannot send a malformed
request), a way to end a TCP connection with a reset, and readers of the
labelled counters of /metrics.
"""
import os
import selectors
import socket
import struct
import time

from envelopes import check
from rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWS, accept_key, parse_close, upgrade_request


def frame_size(n):
    """Bytes on the wire of an unmasked server frame with an 'n'-byte payload."""
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


def masked_frame(opcode, payload):
    """One masked client frame, like rawws.frame but masked with big-integer
    arithmetic instead of byte by byte: fast enough for messages of many
    megabytes."""
    key = os.urandom(4)
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    mask = (key * (n // 4 + 1))[:n]
    return head + key + (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


def pop_frame(ws):
    """Removes the first whole server frame from ws.buf and returns
    (fin, opcode, payload), or None when ws.buf does not hold one yet."""
    buf = ws.buf
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    assert b1 & 0x80 == 0, "server frames must not be masked"
    n, off = b1 & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, off = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, off = struct.unpack("!Q", buf[2:10])[0], 10
    if len(buf) < off + n:
        return None
    payload = bytes(buf[off:off + n])
    ws.buf = buf[off + n:]
    return bool(b0 & 0x80), b0 & 0x0F, payload


def read_messages(conns, counts, timeout):
    """Reads every RawWS of 'conns' at once until conns[i] has received
    counts[i] more data messages. Returns one list of (opcode, payload) per
    connection. Pings and pongs are skipped; a close frame, an end of stream
    or the timeout fail with what each connection had received so far."""
    got = [[] for _ in conns]

    def take(i, op, payload):
        got[i].append((op, payload))
        return True
    _read(conns, counts, timeout, take)
    return got


def read_envelopes(conns, counts, timeout, counted=None, raw=False):
    """Reads every RawWS of 'conns' at once until conns[i] has received
    counts[i] more envelopes for which counted(env) holds (every envelope
    when 'counted' is None). Returns one list per connection of every
    envelope read, counted or not, in order: dicts checked against the
    server schema with envelopes.check(), or (dict, text bytes) pairs when
    'raw'. A binary message fails; what arrives after the last counted
    envelope stays buffered for the next read. Pings and pongs are skipped;
    a close frame, an end of stream or the timeout fail as in
    read_messages."""
    got = [[] for _ in conns]

    def take(i, op, payload):
        assert op == OP_TEXT, "connection %d got opcode %r, not a text envelope: %r" % (i, op, payload[:200])
        env = check(payload)
        got[i].append((env, payload) if raw else env)
        return counted is None or bool(counted(env))
    _read(conns, counts, timeout, take)
    return got


def _read(conns, counts, timeout, take):
    """Reads 'conns' at once, handing each data message to take(i, opcode,
    payload), until take has returned True counts[i] times for conns[i]."""
    n = [0] * len(conns)
    sel = selectors.DefaultSelector()

    def pump(i):
        ws = conns[i]
        while n[i] < counts[i]:
            f = pop_frame(ws)
            if f is None:
                return
            fin, op, payload = f
            if op in (OP_PING, OP_PONG):
                continue
            if op == OP_CLOSE:
                raise AssertionError("connection %d was closed with %r after %d messages"
                                     % (i, parse_close(payload), n[i]))
            assert fin, "the server fragmented a message"
            if take(i, op, payload):
                n[i] += 1

    for i, ws in enumerate(conns):
        pump(i)
        if n[i] < counts[i]:
            sel.register(ws.sock, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out; messages received per connection: %r (wanted %r)"
                                     % (n, list(counts)))
            for key, _ in sel.select(left):
                i = key.data
                ws = conns[i]
                chunk = ws.sock.recv(1 << 20)
                if not chunk:
                    raise AssertionError("connection %d ended after %d of %d messages" % (i, n[i], counts[i]))
                ws.buf += chunk
                pump(i)
                if n[i] >= counts[i]:
                    sel.unregister(ws.sock)
    finally:
        sel.close()


def drain_to_end(ws, timeout):
    """Reads 'ws' until the server ends the TCP connection. Returns
    (data messages, close payload or None, bytes left over that do not make a
    whole frame). Frames after a close frame are an error."""
    ws.sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    messages, close = [], None
    while True:
        while True:
            f = pop_frame(ws)
            if f is None:
                break
            fin, op, payload = f
            assert close is None, "a frame after the close frame: opcode %r" % op
            if op == OP_CLOSE:
                close = payload
            elif op not in (OP_PING, OP_PONG):
                messages.append((op, payload))
        if time.monotonic() > deadline:
            raise AssertionError("the server did not end the connection within %.1f s" % timeout)
        try:
            chunk = ws.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return messages, close, bytes(ws.buf)
        ws.buf += chunk


def connect_many(port, n, timeout=5.0, rcvbuf=None, path="/"):
    """Opens 'n' upgraded RawWS connections, sending every request before
    reading any answer. 'path' is the request target of each (on the bus
    port, its query string sets the client's identity, initial channel and
    echo: see envelopes.query). Nothing is read after the 101: on the bus
    port the welcome envelope is the first message each will read."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(timeout)
            s.connect(("127.0.0.1", port))
        conns, keys = [], []
        for s in socks:
            ws = RawWS.__new__(RawWS)  # an already connected socket, upgraded below
            ws.sock, ws.buf, ws.status, ws.headers = s, b"", None, {}
            req, key = upgrade_request(path=path)
            s.sendall(req)
            conns.append(ws)
            keys.append(key)
        for ws, key in zip(conns, keys):
            ws.status, ws.headers = ws.read_http_head()
            assert ws.status == 101, "upgrade failed: %r %r" % (ws.status, ws.headers)
            assert ws.headers.get("sec-websocket-accept") == accept_key(key)
        return conns
    except BaseException:
        for s in socks:
            s.close()
        raise


def reset(sock):
    """Closes 'sock' with a TCP reset instead of a FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_eof(sock):
    """Reads 'sock' until the peer closes or resets it; returns the bytes."""
    raw = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return raw
        if not chunk:
            return raw
        raw += chunk


def http_request(port, data, timeout=5.0):
    """Sends 'data' (bytes) on a fresh connection to 'port' and reads until the
    server closes it. Returns (status, {lower-case name: value}, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        raw = read_to_eof(s)
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no complete response head: %r" % raw[:200]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def closed_total(metrics):
    """The sum of arqonbus_connections_closed_total over every reason."""
    return sum(v for k, v in metrics.items() if k.startswith("arqonbus_connections_closed_total{"))


def closed_by_reason(metrics):
    """{reason: count} of arqonbus_connections_closed_total."""
    out = {}
    for k, v in metrics.items():
        if k.startswith('arqonbus_connections_closed_total{reason="'):
            out[k.split('"')[1]] = v
    return out


def by_type(metrics, family):
    """{type: value} of 'family', a counter labelled by envelope type
    (arqonbus_messages_received_total, arqonbus_messages_delivered_total)."""
    prefix = family + '{type="'
    return {k[len(prefix):-2]: v for k, v in metrics.items() if k.startswith(prefix)}


def type_deltas(before, after, family):
    """How 'family' moved, by type, between two metrics snapshots: {type:
    delta} of each type whose count changed."""
    b, a = by_type(before, family), by_type(after, family)
    assert a, "no %s{type=...} series in /metrics" % family
    return {t: a[t] - b.get(t, 0) for t in a if a[t] != b.get(t, 0)}
