"""A raw-socket WebSocket client for hostile and byte-exact tests.

It builds every frame by hand, so tests can send what no well-behaved
library would: unmasked frames, reserved bits, bad opcodes, lying lengths,
invalid UTF-8, split writes.
"""
import base64
import hashlib
import os
import socket
import struct
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(path="/", host="127.0.0.1", key=None, version="13", extra=""):
    key = key or base64.b64encode(os.urandom(16)).decode()
    return ("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: %s\r\n%s\r\n" % (path, host, key, version, extra)).encode(), key


def frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None, mask_key=None):
    """Encodes one frame. 'length' overrides the announced payload length."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = mask_key or os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def close_payload(code, reason=b""):
    return struct.pack("!H", code) + reason


class RawWS:
    """A connected socket, upgraded unless upgrade=False; over TLS when 'tls'
    is an ssl.SSLContext (the handshake is done before the upgrade). Over
    TLS, an end without close_notify raises ssl.SSLEOFError instead of
    reading as b""."""

    def __init__(self, port, upgrade=True, timeout=5.0, path="/", tls=None, extra=""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
        self.buf = b""
        self.status = None
        self.headers = {}
        if upgrade:
            req, key = upgrade_request(path=path, extra=extra)
            self.sock.sendall(req)
            self.status, self.headers = self.read_http_head()
            assert self.status == 101, "upgrade failed: %r %r" % (self.status, self.headers)
            assert self.headers.get("sec-websocket-accept") == accept_key(key)

    def send(self, data):
        self.sock.sendall(data)

    def send_frame(self, *a, **kw):
        self.sock.sendall(frame(*a, **kw))

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by the server")
            self.buf += chunk

    def read_http_head(self):
        """Reads a response head; returns (status, {lower-case name: value})."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed before the response head")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    def read_http_response(self):
        """Reads a whole response with Content-Length; returns (status, headers, body)."""
        status, headers = self.read_http_head()
        n = int(headers.get("content-length", "0"))
        self._fill(n)
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def recv_frame(self):
        """Returns (fin, opcode, payload) of the next server frame."""
        self._fill(2)
        b0, b1 = self.buf[0], self.buf[1]
        assert b1 & 0x80 == 0, "server frames must not be masked"
        n = b1 & 0x7F
        off = 2
        if n == 126:
            self._fill(4)
            n = struct.unpack("!H", self.buf[2:4])[0]
            off = 4
        elif n == 127:
            self._fill(10)
            n = struct.unpack("!Q", self.buf[2:10])[0]
            off = 10
        self._fill(off + n)
        payload = self.buf[off:off + n]
        self.buf = self.buf[off + n:]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_message(self, skip_pings=True):
        """Returns (opcode, payload) of the next data or close message."""
        while True:
            fin, op, payload = self.recv_frame()
            if skip_pings and op in (OP_PING, OP_PONG):
                continue
            return op, payload

    def expect_close(self, timeout=5.0, skipped=None):
        """Reads until a close frame; returns (code, reason). Data frames are
        skipped; when 'skipped' is a list, (opcode, payload) of each skipped
        data frame is appended to it so that the caller can check them."""
        self.sock.settimeout(timeout)
        while True:
            fin, op, payload = self.recv_frame()
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:].decode("utf-8", "replace")
            if skipped is not None and op not in (OP_PING, OP_PONG):
                skipped.append((op, payload))

    def wait_eof(self, timeout=5.0):
        """Waits until the server closes the TCP connection; returns seconds waited."""
        start = time.monotonic()
        self.sock.settimeout(timeout)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - start
            if not chunk:
                return time.monotonic() - start
            self.buf += chunk

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- helpers for handshake, frame and close tests ---------------------------

def padded_upgrade_request(size, path="/", key=None):
    """An upgrade request whose head is exactly 'size' bytes, padded with one
    X-Pad header field. Returns (request bytes, key)."""
    base, key = upgrade_request(path=path, key=key, extra="X-Pad: \r\n")
    pad = size - len(base)
    assert pad >= 0, "a request head cannot be shorter than %d bytes" % len(base)
    req, key = upgrade_request(path=path, key=key, extra="X-Pad: %s\r\n" % ("a" * pad))
    assert len(req) == size
    return req, key


def set_nodelay(sock):
    """Sends each write as its own TCP segment."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_bytewise(sock, data, pause=0.001):
    """Sends 'data' one byte per write, pausing between writes so that the
    server sees each byte in a read of its own."""
    for i in range(len(data)):
        sock.sendall(data[i:i + 1])
        if pause:
            time.sleep(pause)


def still_open(sock):
    """True when the peer has neither closed nor reset 'sock' and has sent
    nothing: a non-blocking read would block."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return False


def parse_close(payload):
    """Splits a close frame payload into (code or None, reason bytes)."""
    if len(payload) < 2:
        return None, payload
    return struct.unpack("!H", payload[:2])[0], payload[2:]
