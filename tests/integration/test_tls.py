"""TLS on the three ports (tls_cert, tls_key, tls_min_version).

Each test generates its own self-signed certificate with the openssl command
line tool and talks to the real server with Python's ssl module: wss:// on
the bus and telemetry ports (the raw-socket clients of rawws.py over an ssl
socket), https:// on the ops port. Hostile cases (old protocol versions,
plaintext on a TLS port, silence) use raw sockets. Times are liveness bounds
only (scaled by SLOW under ASan).
"""
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time

import pytest
import websockets

from conftest import BIN, SLOW
from envelopes import Bus, check
from rawws import OP_CLOSE, OP_TEXT, RawWS, frame, parse_close, upgrade_request
from wsutil import closed_by_reason, read_to_eof

TIMEOUT = 5.0 * SLOW
TLS_ERRORS = "arqonbus_tls_handshake_errors_total"
RELOADS_OK = 'arqonbus_tls_reloads_total{result="ok"}'
RELOADS_FAILED = 'arqonbus_tls_reloads_total{result="failed"}'


def make_cert(directory, name, cn="127.0.0.1"):
    """Writes a self-signed P-256 certificate for 127.0.0.1 and its key to
    'directory'; returns (cert path, key path)."""
    cert = os.path.join(directory, name + "-cert.pem")
    key = os.path.join(directory, name + "-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=" + cn,
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def der_of(cert):
    with open(cert) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def client_context(cert=None, **versions):
    """A client context that trusts 'cert' (None: trusts anything). An end
    of the connection without close_notify is an error (ssl.SSLEOFError)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    if cert is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cert)
    for k, v in versions.items():
        setattr(ctx, k, v)
    return ctx


@pytest.fixture
def certdir():
    d = tempfile.mkdtemp(prefix="arqonbus-tls-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def tls_server(make_server, certdir, args=()):
    """A server with TLS on; returns (server, client context, cert path, key path)."""
    cert, key = make_cert(certdir, "server")
    server = make_server(args=["--tls-cert", cert, "--tls-key", key] + list(args))
    ctx = client_context(cert)
    server.tls = ctx
    return server, ctx, cert, key


def wait_for(predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def event(channel, **payload):
    room, ch = channel.split(":")
    return {"type": "event", "room": room, "channel": ch, "payload": payload}


def next_event(bus):
    """The next event envelope 'bus' receives (notifications skipped)."""
    return bus.recv_until(lambda e: e["type"] == "event")[0]


# ---- the three ports over TLS -------------------------------------------------

def test_bus_over_wss_envelopes_and_a_message_of_many_records(make_server, certdir):
    server, ctx, cert, _ = tls_server(make_server, certdir)
    a = Bus(server.port, timeout=TIMEOUT, tls=ctx, channel="lab:tls")
    b = Bus(server.port, timeout=TIMEOUT, tls=ctx, channel="lab:tls")
    assert a.ws.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert a.ws.sock.getpeercert(binary_form=True) == der_of(cert)
    a.send(event("lab:tls", text="hello over tls"))
    env = next_event(b)
    assert env["type"] == "event" and env["payload"] == {"text": "hello over tls"}, env

    # 300 KB: about 19 records each way; the server's reads split it wherever
    # the records and TCP segments fall.
    big = "".join(chr(0x41 + i % 26) for i in range(300000))
    a.send(event("lab:tls", big=big))
    env = next_event(b)
    assert env["payload"]["big"] == big

    # A frame sent a few bytes per record: every record holds a piece of a
    # frame, never a whole one.
    data = frame(OP_TEXT, json.dumps(event("lab:tls", piecewise=True)).encode())
    for i in range(0, len(data), 7):
        b.ws.sock.sendall(data[i:i + 7])
    env = next_event(a)
    assert env["payload"] == {"piecewise": True}, env

    # A command and its reply.
    reply = a.command("list_channels", {"room": "lab"})
    assert reply["type"] == "system", reply
    a.close()
    b.close()


def test_many_messages_both_ways_arrive_intact_and_in_order(make_server, certdir):
    # Both clients send everything before reading: their queues must hold it.
    server, ctx, _, _ = tls_server(make_server, certdir, args=["--max-outbound-queue", "16MiB"])
    a = Bus(server.port, timeout=TIMEOUT, tls=ctx, channel="lab:order")
    b = Bus(server.port, timeout=TIMEOUT, tls=ctx, channel="lab:order")
    n = 2000
    # Interleaved sends, of sizes that straddle record boundaries when coalesced.
    for i in range(n):
        a.send(event("lab:order", seq=i, by="a", pad="a" * (i % 700)))
        b.send(event("lab:order", seq=i, by="b", pad="b" * (i % 900)))
    for me, other, width in ((a, "b", 900), (b, "a", 700)):
        for i in range(n):
            env = next_event(me)
            assert env["payload"] == {"seq": i, "by": other, "pad": other * (i % width)}, (i, env["payload"])
    a.close()
    b.close()


def test_a_websockets_library_client_over_wss(make_server, certdir):
    """A third-party client: the welcome, an event echoed back, a clean close
    handshake (the library's close frame, then its close_notify)."""
    server, ctx, _, _ = tls_server(make_server, certdir)

    async def main():
        url = "wss://127.0.0.1:%d/?client_id=lib-tls&channel=lab:lib&echo=true" % server.port
        async with websockets.connect(url, ssl=ctx, open_timeout=TIMEOUT) as ws:
            welcome = check(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert welcome["payload"]["client_id"] == "lib-tls", welcome
            await ws.send(json.dumps(event("lab:lib", text="x" * 50000)))
            while True:
                env = check(await asyncio.wait_for(ws.recv(), TIMEOUT))
                if env["type"] == "event":
                    break
            assert env["payload"] == {"text": "x" * 50000}
        assert ws.close_code == 1000
    asyncio.run(main())
    server.wait_metric('arqonbus_connections_closed_total{reason="normal"}', lambda v: v == 1)


def test_telemetry_over_wss(make_server, certdir):
    server, ctx, _, _ = tls_server(make_server, certdir)
    mon = RawWS(server.telemetry_port, timeout=TIMEOUT, path="/?events=client_connected", tls=ctx)
    op, payload = mon.recv_message()
    assert op == OP_TEXT
    welcome = check(payload)
    assert welcome["payload"]["event"] == "welcome", welcome
    bus = Bus(server.port, timeout=TIMEOUT, tls=ctx, client_id="agent-tls")
    op, payload = mon.recv_message()
    env = check(payload)
    assert env["eventType"] == "client_connected" and env["payload"]["client_id"] == "agent-tls", env
    bus.close()
    mon.close()


def test_ops_port_answers_https(make_server, certdir):
    server, ctx, _, _ = tls_server(make_server, certdir)
    status, headers, body = server.http("/health")
    assert status == 200, body
    assert b"ok" in body
    status, _, body = server.http("/version")
    assert status == 200
    m = server.metrics()
    assert m[TLS_ERRORS] == 0
    assert m[RELOADS_OK] == 0 and m[RELOADS_FAILED] == 0
    body = server.http("/metrics")[2].decode()
    assert "# TYPE arqonbus_tls_handshake_errors_total counter" in body
    assert "# TYPE arqonbus_tls_reloads_total counter" in body
    # Without TLS the families are not exposed, and SIGHUP changes nothing.
    plain = make_server()
    assert not any(k.startswith("arqonbus_tls_") for k in plain.metrics())
    plain.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "no certificate to reload" in plain.log(), "the SIGHUP log line")
    assert plain.http("/health")[0] == 200


# ---- refused handshakes ---------------------------------------------------------

def expect_refused(server, ctx, port):
    """A TLS handshake with 'ctx' on 'port' fails; the failure is counted."""
    before = server.metrics()[TLS_ERRORS]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    server.wait_metric(TLS_ERRORS, lambda v: v == before + 1)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_client_is_refused_and_the_server_stays_up(make_server, certdir):
    server, ctx, cert, _ = tls_server(make_server, certdir)
    old = client_context(cert, minimum_version=ssl.TLSVersion.TLSv1_1, maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # or the client would not offer TLS 1.1 at all
    for port in (server.port, server.telemetry_port, server.http_port):
        expect_refused(server, old, port)
    assert "tls handshake failed" in server.log()
    assert re.search(r"why=.*(version|protocol)", server.log()), server.log()[-2000:]
    with Bus(server.port, timeout=TIMEOUT, tls=ctx) as bus:
        assert bus.ws.sock.version() == "TLSv1.3"
    assert server.http("/health")[0] == 200


def test_min_version_1_3_refuses_a_1_2_client(make_server, certdir):
    server, ctx, cert, _ = tls_server(make_server, certdir, args=["--tls-min-version", "1.3"])
    only12 = client_context(cert, maximum_version=ssl.TLSVersion.TLSv1_2)
    expect_refused(server, only12, server.port)
    # The default (1.2) accepts the same client.
    other = tempfile.mkdtemp(dir=certdir)
    server12, _, _, _ = tls_server(make_server, other)
    with Bus(server12.port, timeout=TIMEOUT, tls=client_context(None, maximum_version=ssl.TLSVersion.TLSv1_2)) as bus:
        assert bus.ws.sock.version() == "TLSv1.2"
    assert server12.metrics()[TLS_ERRORS] == 0
    # TLS 1.2 without forward secrecy or without AEAD is refused.
    for cipher in ("AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256"):
        weak = client_context(None, maximum_version=ssl.TLSVersion.TLSv1_2)
        weak.set_ciphers(cipher)
        expect_refused(server12, weak, server12.port)


def test_plaintext_on_a_tls_port_is_closed_without_an_answer(make_server, certdir):
    server, ctx, _, _ = tls_server(make_server, certdir)
    before = server.metrics()[TLS_ERRORS]
    failed = closed_by_reason(server.metrics())["handshake_failed"]
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_to_eof(s)
    assert not answer.startswith(b"HTTP/"), answer[:200]
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall(upgrade_request()[0])
        answer = read_to_eof(s)
    assert b"HTTP/" not in answer, answer[:200]
    server.wait_metric(TLS_ERRORS, lambda v: v == before + 2)
    # The bus port's one is a failed handshake among the closed connections
    # too; the ops port's is not (no ops request is counted there).
    server.wait_metric('arqonbus_connections_closed_total{reason="handshake_failed"}', lambda v: v == failed + 1)
    assert server.http("/health")[0] == 200


def test_tls_handshake_counts_against_the_handshake_timeout(make_server, certdir):
    server, ctx, _, _ = tls_server(make_server, certdir, args=["--handshake-timeout", "300ms"])
    key = 'arqonbus_connections_closed_total{reason="handshake_timeout"}'
    before = server.metrics()[key]
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello, then silence
        assert read_to_eof(s) == b""
    server.wait_metric(key, lambda v: v == before + 1)
    assert "tls handshake timed out" in server.log()


# ---- certificate reload ------------------------------------------------------------

def replace_file(path, data):
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def peer_cert(port):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with client_context(None).wrap_socket(raw) as s:
            return s.getpeercert(binary_form=True)


def test_sighup_reloads_the_certificate_for_new_connections(make_server, certdir):
    server, ctx, cert, key = tls_server(make_server, certdir)
    first = der_of(cert)
    a = Bus(server.port, timeout=TIMEOUT, tls=ctx, channel="lab:reload")
    new_cert, new_key = make_cert(certdir, "renewed", cn="renewed")
    server.tls = client_context(None)  # /metrics is asked with either certificate
    replace_file(key, read(new_key))
    replace_file(cert, read(new_cert))
    server.proc.send_signal(signal.SIGHUP)
    server.wait_metric(RELOADS_OK, lambda v: v == 1)
    assert "certificate reloaded" in server.log()
    for port in (server.port, server.telemetry_port, server.http_port):
        assert peer_cert(port) == der_of(new_cert) != first
    # The connection opened before the reload goes on with the old session.
    assert a.ws.sock.getpeercert(binary_form=True) == first
    b = Bus(server.port, timeout=TIMEOUT, tls=client_context(new_cert), channel="lab:reload")
    a.send(event("lab:reload", n=1))
    assert next_event(b)["payload"] == {"n": 1}
    b.send(event("lab:reload", n=2))
    assert next_event(a)["payload"] == {"n": 2}
    a.close()
    b.close()


def test_sighup_with_a_broken_certificate_keeps_the_old_one(make_server, certdir):
    server, ctx, cert, key = tls_server(make_server, certdir)
    first = der_of(cert)
    replace_file(cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_metric(RELOADS_FAILED, lambda v: v == 1)
    assert re.search(r"level=error component=tls msg=\"certificate reload failed", server.log()), server.log()
    assert peer_cert(server.port) == first
    # A key that belongs to another certificate fails the same way.
    _, other_key = make_cert(certdir, "other")
    replace_file(cert, der_to_pem(first))
    replace_file(key, read(other_key))
    server.proc.send_signal(signal.SIGHUP)
    server.wait_metric(RELOADS_FAILED, lambda v: v == 2)
    assert "does not match" in server.log()
    assert peer_cert(server.port) == first
    with Bus(server.port, timeout=TIMEOUT, tls=ctx):
        pass
    assert server.metrics()[RELOADS_OK] == 0


def der_to_pem(der):
    return ssl.DER_cert_to_PEM_cert(der).encode()


# ---- refused starts ------------------------------------------------------------------

def start_refused(args):
    """Runs the binary, which must refuse to start: exit 2, one line on stderr."""
    proc = subprocess.run([BIN] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=10 * SLOW, env={k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")})
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err)
    assert proc.stdout == b"", proc.stdout
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("arqonbus: "), err
    return lines[0]


def test_start_refused_without_a_matching_key(certdir):
    cert, key = make_cert(certdir, "server")
    _, other_key = make_cert(certdir, "other")
    line = start_refused(["--tls-cert", cert])
    assert "tls_cert and tls_key go together" in line, line
    line = start_refused(["--tls-key", key])
    assert "tls_cert and tls_key go together" in line, line
    line = start_refused(["--tls-cert", cert, "--tls-key", os.path.join(certdir, "missing.pem")])
    assert "tls_key" in line and "No such file" in line, line
    line = start_refused(["--tls-cert", cert, "--tls-key", other_key])
    assert "does not match the certificate" in line and other_key in line, line
    line = start_refused(["--tls-cert", key, "--tls-key", key])
    assert "cannot load the certificate chain" in line and "tls_cert" in line, line
    line = start_refused(["--tls-cert", cert, "--tls-key", cert])
    assert "cannot load the private key" in line and "tls_key" in line, line
    line = start_refused(["--tls-cert", cert, "--tls-key", key, "--tls-min-version", "1.1"])
    assert "tls_min_version" in line and "1.2 or 1.3" in line, line


# ---- the queue bound over TLS ------------------------------------------------------------

def test_slow_reader_over_tls_is_closed_as_a_slow_consumer(make_server, certdir):
    server, ctx, _, _ = tls_server(make_server, certdir, args=["--max-outbound-queue", "64KiB",
                                                               "--write-timeout", "60s", "--close-timeout", "1s"])
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(TIMEOUT)
    raw.connect(("127.0.0.1", server.port))
    slow = RawWS.__new__(RawWS)
    slow.sock, slow.buf, slow.status, slow.headers = ctx.wrap_socket(raw, server_hostname="127.0.0.1",
                                                                       suppress_ragged_eofs=False), b"", None, {}
    req, _ = upgrade_request(path="/?channel=lab:slow")
    slow.sock.sendall(req)
    assert slow.read_http_head()[0] == 101
    op, payload = slow.recv_message()  # the welcome; then it does not read
    assert check(payload)["payload"]["event"] == "welcome"

    pub = Bus(server.port, timeout=TIMEOUT, tls=ctx)
    before = server.metrics()["arqonbus_slow_consumer_closes_total"]
    body = event("lab:slow", pad="x" * 12000)
    deadline = time.monotonic() + 20 * SLOW
    sent = 0
    while server.metrics()["arqonbus_slow_consumer_closes_total"] == before:
        assert time.monotonic() < deadline, "never closed as a slow consumer:\n" + server.log()[-2000:]
        for _ in range(10):
            pub.send(body)
        sent += 10
        assert sent < 3000, "never closed as a slow consumer after %d events" % sent
    assert "slow consumer closed" in server.log()
    # What it reads now ends with the close frame 1008 slow_consumer, then
    # close_notify and the end of the connection.
    slow.sock.settimeout(TIMEOUT)
    while True:
        fin, op, payload = slow.recv_frame()
        if op == OP_CLOSE:
            break
        assert op == OP_TEXT
        check(payload)
    assert parse_close(payload) == (1008, b"slow_consumer")
    assert slow.sock.recv(1) == b""  # a clean close_notify, not a bare EOF (ssl.SSLEOFError)
    slow.close()
    pub.close()


def test_shutdown_sends_1001_then_close_notify(make_server, certdir):
    server, ctx, _, _ = tls_server(make_server, certdir)
    bus = Bus(server.port, timeout=TIMEOUT, tls=ctx)
    mon = RawWS(server.telemetry_port, timeout=TIMEOUT, path="/?events=stats", tls=ctx)
    mon.recv_message()
    server.proc.send_signal(signal.SIGTERM)
    for ws in (bus.ws, mon):
        code, reason = ws.expect_close(TIMEOUT)
        assert code == 1001, (code, reason)
        ws.send_frame(OP_CLOSE, struct.pack("!H", 1001))
        assert ws.sock.recv(1) == b""  # close_notify, then the server's FIN
        ws.close()
    # It exits on its own; a second SIGTERM (stop() sends one to a process
    # still running) could arrive after its handlers are gone.
    server.proc.wait(20 * SLOW)
    assert server.stop() == 0
