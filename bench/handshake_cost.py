#!/usr/bin/python3
"""Server CPU time per WebSocket handshake, by authentication mode.

Starts the server on free ports once per mode (no authentication, an API
key, HS256, RS256 and ES256 tokens; keys and tokens made here with Debian's
python3-jwt and python3-cryptography), opens N connections one after the
other (upgrade, read the 101, close) and prints the server's user+system CPU
time (from /proc) divided by N: what one connection costs the server,
credential check included. Token modes run twice: with a new token for
every connection (each checked in full) and with one token for all (a
client reconnecting: the server remembers tokens it verified).

    /usr/bin/python3 bench/handshake_cost.py [--server build/release/arqonbus] [-n 2000]
"""
import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from idle_memory import free_ports, wait_listening  # noqa: E402
from rawws import upgrade_request  # noqa: E402

SECRET = "handshake-cost-secret-0123456789abcdef"
API_KEY = "handshake-cost-api-key-0123456789"


def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def public_pem(key, tmp):
    path = os.path.join(tmp, "%s.pem" % type(key).__name__)
    with open(path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def measure(server, args, headers, n):
    ports = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    log_path = os.path.join(tempfile.mkdtemp(prefix="handshake-cost-"), "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([server, "--port", str(ports[0]), "--telemetry-port", str(ports[1]), "--http-port",
                                 str(ports[2]), "--log-level", "warn"] + args,
                                stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        wait_listening(proc, ports[0], log_path)
        before = cpu_seconds(proc.pid)
        for k in range(n):
            s = socket.create_connection(("127.0.0.1", ports[0]))
            req, _ = upgrade_request(extra=headers[k % len(headers)])
            s.sendall(req)
            head = s.recv(12)
            assert head == b"HTTP/1.1 101", head
            s.close()
        return (cpu_seconds(proc.pid) - before) / n
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=os.path.join(ROOT, "build", "release", "arqonbus"))
    ap.add_argument("-n", type=int, default=2000)
    o = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="handshake-cost-")
    exp = int(time.time()) + 3600
    rsa_key, ec_key = rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())
    keyline = "%s:bench:user" % hashlib.sha256(API_KEY.encode()).hexdigest()
    def tokens(key, alg, count):
        return [jwt.encode({"sub": "bench%d" % k, "exp": exp}, key, algorithm=alg) for k in range(count)]

    def bearer(credentials):
        return ["Authorization: Bearer %s\r\n" % c for c in credentials]

    modes = [("none", [], [""]), ("api_key", ["--auth", "api_key", "--api-keys", keyline], bearer([API_KEY]))]
    for alg, key, args in (("HS256", SECRET, ["--jwt-secret", SECRET]),
                           ("RS256", rsa_key, ["--jwt-key-file", public_pem(rsa_key, tmp)]),
                           ("ES256", ec_key, ["--jwt-key-file", public_pem(ec_key, tmp)])):
        args = ["--auth", "jwt", "--jwt-algorithm", alg] + args
        modes.append(("jwt %s, a new token each" % alg, args, bearer(tokens(key, alg, o.n))))
        modes.append(("jwt %s, one token" % alg, args, bearer(tokens(key, alg, 1))))
    for name, args, headers in modes:
        per = measure(o.server, args, headers, o.n)
        print("%-30s %6.0f us server CPU per connection (%d connections)" % (name, per * 1e6, o.n))


if __name__ == "__main__":
    main()
