"""Envelope-aware probes for the heartbeat, process and ops tests.

These tests are about the transport and the process (heartbeat, shutdown,
churn, abrupt peers, metrics), not about routing; since protocol v1 every
message on the bus port is an envelope, so they read the welcome every bus
connection gets, check every envelope they receive against the published
schema (envelopes.check) and use an echo connection or the ping command where
they need a message to come back.
"""
import json
import socket
import time

from envelopes import Bus, check
from rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWS, accept_key, close_payload, parse_close, upgrade_request
from wsutil import pop_frame

ECHO_CHANNEL = "t:echo"


def read_envelope(ws, timeout=5.0):
    """The next data message of the RawWS 'ws' (pings and pongs skipped): it
    must be a text message holding a valid server envelope. Returns the dict."""
    ws.sock.settimeout(timeout)
    op, payload = ws.recv_message()
    assert op == OP_TEXT, "expected an envelope in a text frame, got opcode %r: %r" % (op, payload[:200])
    return check(payload)


def read_welcome(ws, timeout=5.0):
    """Reads and checks the welcome a new bus connection gets first."""
    env = read_envelope(ws, timeout)
    assert env["type"] == "system" and env["payload"]["event"] == "welcome", env
    return env


def expect_only_close(ws, timeout=5.0):
    """Reads 'ws' up to the server's close frame and returns (code, reason).
    Anything but pings and pongs before the close fails: every envelope the
    connection was due has been read already."""
    ws.sock.settimeout(timeout)
    while True:
        fin, op, payload = ws.recv_frame()
        if op in (OP_PING, OP_PONG):
            continue
        if op == OP_CLOSE:
            code, reason = parse_close(payload)
            return code, reason.decode("utf-8", "replace")
        if op == OP_TEXT:
            check(payload)
        raise AssertionError("a message before the close frame: opcode %r %r" % (op, payload[:300]))


def echo_bus(port, timeout=5.0, channel=ECHO_CHANNEL, **params):
    """A Bus that gets its own events back on its initial channel."""
    bus = Bus(port, timeout=timeout, echo=True, channel=channel, **params)
    assert bus.welcome["payload"]["echo"] is True, bus.welcome
    assert bus.welcome["payload"]["subscriptions"] == [channel], bus.welcome
    return bus


def echo_roundtrip(bus, data):
    """Publishes {'data': data} to the echo connection's initial channel and
    asserts that the event comes back as sent, from this client."""
    bus.send({"type": "event", "payload": {"data": data}})
    env = bus.recv()
    assert env["type"] == "event", env
    assert [env["room"] + ":" + env["channel"]] == bus.welcome["payload"]["subscriptions"], env
    assert env["from"] == bus.id, env
    assert env["payload"] == {"data": data}, env
    return env


def ping_roundtrip(bus, cid, data=None):
    """Sends the ping command with id 'cid' and asserts its pong reply."""
    env = {"type": "command", "command": "ping", "id": cid}
    if data is not None:
        env["payload"] = {"data": data}
    bus.send(env)
    reply = bus.recv()
    assert_pong(reply, cid)
    if data is not None:
        assert reply["payload"]["data"] == data, reply
    return reply


def assert_pong(env, cid):
    assert env["type"] == "system", env
    assert (env["command"], env["correlation_id"]) == ("pong", cid), env
    assert "server_time" in env["payload"], env


def bus_serves(port, timeout=5.0):
    """The bus still serves a new client: its welcome, an event echoed back on
    its channel and a command answered."""
    with echo_bus(port, timeout=timeout) as bus:
        echo_roundtrip(bus, "still serving")
        ping_roundtrip(bus, "arq_still_serving", data="still serving")
        bus.ws.send_frame(OP_CLOSE, close_payload(1000))
        assert expect_only_close(bus.ws, timeout) == (1000, "")


def status(port, timeout=5.0):
    """The payload of a `status` reply, asked on a fresh connection (which is
    itself one of the clients counted)."""
    with Bus(port, timeout=timeout) as bus:
        reply = bus.command("status")
        assert bus.skipped == [], bus.skipped
        assert reply["type"] == "system" and reply["command"] == "status", reply
        s = reply["payload"]
        assert s["you"]["client_id"] == bus.id, s
        # The figures agree with each other.
        assert sum(s["clients"]["by_type"].values()) == s["clients"]["total"], s
        return s


def connect_paths(port, paths, timeout=5.0):
    """Like wsutil.connect_many, with one request path (query) per connection:
    every request is sent before any answer is read. Returns the RawWS list
    (welcomes not read)."""
    socks = []
    try:
        for _ in paths:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(timeout)
            s.connect(("127.0.0.1", port))
        conns, keys = [], []
        for s, path in zip(socks, paths):
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


def nothing_pending(ws):
    """True when 'ws' holds no unread byte and the server has sent nothing
    more: closing it now sends a FIN, not a reset (Linux resets a connection
    closed with unread data)."""
    if ws.buf:
        return False
    sock = ws.sock
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def drain_envelopes(ws, quiet=0.3, timeout=10.0):
    """Reads every envelope 'ws' receives until none arrives for 'quiet'
    seconds; returns them, checked."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        f = pop_frame(ws)
        if f is not None:
            fin, op, payload = f
            if op in (OP_PING, OP_PONG):
                continue
            assert op == OP_TEXT, "opcode %r %r" % (op, payload[:200])
            out.append(check(payload))
            continue
        assert time.monotonic() < deadline, "still receiving after %.1f s" % timeout
        ws.sock.settimeout(quiet)
        try:
            chunk = ws.sock.recv(1 << 20)
        except socket.timeout:
            return out
        assert chunk, "the server ended the connection"
        ws.buf += chunk


class CountingSocket:
    """Wraps a socket and counts the bytes it sends and receives."""

    def __init__(self, sock):
        self._sock = sock
        self.sent = 0
        self.received = 0

    def sendall(self, data):
        self._sock.sendall(data)
        self.sent += len(data)

    def recv(self, n, *flags):
        data = self._sock.recv(n, *flags)
        if not flags:
            self.received += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def counted_bus(port, timeout=5.0, **params):
    """A Bus whose socket counts every byte both ways, the upgrade included.
    Returns (bus, counting socket, bytes of the upgrade request)."""
    from envelopes import query
    sock = CountingSocket(socket.create_connection(("127.0.0.1", port), timeout=timeout))
    ws = RawWS.__new__(RawWS)
    ws.sock, ws.buf, ws.status, ws.headers = sock, b"", None, {}
    req, key = upgrade_request(path=query(**params))
    sock.sendall(req)
    ws.status, ws.headers = ws.read_http_head()
    assert ws.status == 101 and ws.headers.get("sec-websocket-accept") == accept_key(key)
    bus = Bus.__new__(Bus)
    bus.ws, bus.timeout, bus._n = ws, timeout, 0
    bus.welcome = bus.recv()
    assert bus.welcome["type"] == "system" and bus.welcome["payload"]["event"] == "welcome", bus.welcome
    bus.id = bus.welcome["payload"]["client_id"]
    return bus, sock, len(req)


def members_of(port, channel, timeout=5.0):
    """channel_info of 'room:channel', asked on a fresh connection: the list
    of member client ids (the asker is not one)."""
    room, ch = channel.split(":")
    with Bus(port, timeout=timeout) as bus:
        reply = bus.command("channel_info", {"room": room, "channel": ch})
        assert reply["type"] == "system", reply
        ids = [m["client_id"] for m in reply["payload"]["member_list"]]
        assert reply["payload"]["members"] == len(ids), reply
        return ids


def dumps(env):
    return json.dumps(env, separators=(",", ":"))
