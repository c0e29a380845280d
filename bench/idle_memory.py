#!/usr/bin/python3
"""Resident memory of the server per idle WebSocket connection.

Starts the server on free ports, reads its VmRSS from /proc/PID/status,
opens N WebSocket connections on the bus port (raw sockets, a hand-written
upgrade request, the 101 and its accept key checked), lets them sit idle,
reads VmRSS again and prints the difference per connection. Then it closes
every connection and stops the server.

    /usr/bin/python3 bench/idle_memory.py [--server build/release/arqonbus] [-n 10000] [--tls]

With --tls the server gets a self-signed certificate (made with the openssl
command line tool in the temporary directory) and every connection is wss://.

What is measured is user-space memory only (the connection objects, libuv's
per-descriptor tables, malloc overhead); socket buffers live in the kernel
and are not part of RSS.
"""
import argparse
import base64
import hashlib
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def status_kb(pid, key):
    """A 'kB' field of /proc/PID/status (VmRSS, VmHWM, RssAnon...)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def wait_listening(proc, port, log_path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("idle_memory: the server exited at start:\n" + open(log_path).read())
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("idle_memory: the server does not listen on %d" % port)


def make_cert(directory):
    """A self-signed P-256 certificate and key in 'directory'; returns their paths."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def open_ws(port, tls=None):
    """Returns a socket past a checked 101 ('tls': an ssl.SSLContext, or None)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls is not None:
        s = tls.wrap_socket(s)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, key)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 101 "):
        raise ConnectionError("upgrade refused: " + lines[0])
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != want:
        raise ConnectionError("wrong Sec-WebSocket-Accept")
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=os.path.join(ROOT, "build/release/arqonbus"))
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading VmRSS")
    ap.add_argument("--tls", action="store_true", help="wss:// with a self-signed certificate")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.connections + 32 > hard:
        sys.exit("idle_memory: %d connections need more than the %d file descriptors allowed"
                 % (args.connections, hard))

    args.server = os.path.abspath(args.server)
    port, tport, hport = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="arqidle.") as tmp:
        log_path = os.path.join(tmp, "server.log")
        log = open(log_path, "w")
        tls_args, tls = [], None
        if args.tls:
            cert, key = make_cert(tmp)
            tls_args = ["--tls-cert", cert, "--tls-key", key]
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        # The child inherits the raised limit.
        proc = subprocess.Popen([args.server, "--host", "127.0.0.1", "--port", str(port),
                                 "--telemetry-port", str(tport), "--http-port", str(hport),
                                 "--max-connections", "20000", "--max-connections-per-ip", "20000", "--max-handshakes-per-ip", "20000"] + tls_args,
                                stdout=subprocess.DEVNULL, stderr=log, cwd=tmp)
        socks = []
        ok = False
        try:
            wait_listening(proc, port, log_path)
            time.sleep(args.settle)
            before = status_kb(proc.pid, "VmRSS")
            t0 = time.monotonic()
            for _ in range(args.connections):
                socks.append(open_ws(port, tls))
            setup = time.monotonic() - t0
            time.sleep(args.settle)
            after = status_kb(proc.pid, "VmRSS")
            peak = status_kb(proc.pid, "VmHWM")
            per_conn = (after - before) * 1024 / args.connections
            print("server:            %s (pid %d)" % (args.server, proc.pid))
            print("idle connections:  %d%s (opened in %.1f s)" % (args.connections, " over TLS" if tls else "", setup))
            print("VmRSS before:      %d kB" % before)
            print("VmRSS after:       %d kB (peak %d kB)" % (after, peak))
            print("per connection:    %.0f bytes" % per_conn)
            ok = True
        finally:
            for s in socks:
                s.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
            if not ok:
                sys.stderr.write("idle_memory: the server's log (last 40 lines):\n")
                sys.stderr.write("".join(open(log_path).readlines()[-40:]))


if __name__ == "__main__":
    main()
