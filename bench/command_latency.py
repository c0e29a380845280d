#!/usr/bin/python3
"""Round-trip time of each built-in command on an idle server.

Starts the server on free ports, connects one client (joined to
science:explore) and sends each command N times, one at a time, waiting for
its reply. Prints p50 and p99 of the round trip as the client sees it: the
server's work plus loopback TCP and this Python client's own framing, so the
server's share is smaller than what is printed.

    /usr/bin/python3 bench/command_latency.py [--server build/release/arqonbus] [-n 2000]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from envelopes import Bus, check  # noqa: E402
from idle_memory import free_ports, wait_listening  # noqa: E402

COMMANDS = [
    ("ping", {}),
    ("status", {}),
    ("list_channels", {}),
    ("channel_info", {"channel": "science:explore"}),
    ("history", {"channel": "science:explore"}),
    ("join_channel", {"channel": "science:explore"}),
    ("help", {}),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=os.path.join(ROOT, "build", "release", "arqonbus"))
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    port, tport, hport = free_ports(3)
    log = tempfile.NamedTemporaryFile(prefix="command_latency-", suffix=".log", delete=False)
    proc = subprocess.Popen([args.server, "--port", str(port), "--telemetry-port", str(tport), "--http-port",
                             str(hport), "--log-level", "warn", "--rate-limit-messages", "1000000"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_listening(proc, port, log.name)
        bus = Bus(port, channel="science:explore")
        for i in range(20):  # history to read
            bus.send({"type": "event", "room": "science", "channel": "explore", "payload": {"i": i}})
        print("round trip per command, %d each, one at a time:" % args.n)
        for name, fields in COMMANDS:
            lat = []
            for i in range(args.n):
                env = dict(fields, type="command", command=name, id="arq_%s_%d" % (name, i))
                data = json.dumps(env).encode()
                t = time.perf_counter()
                bus.ws.send_frame(1, data)
                _, payload = bus.ws.recv_message()
                lat.append(time.perf_counter() - t)
                reply = check(payload)  # outside the timing: schema validation is slow in Python
                assert reply.get("correlation_id") == env["id"], reply
            lat.sort()
            print("  %-14s p50 %4.0f us   p99 %4.0f us" % (name, lat[len(lat) // 2] * 1e6,
                                                       lat[int(len(lat) * 0.99)] * 1e6))
        bus.close()
    finally:
        proc.terminate()
        proc.wait(10)
        os.unlink(log.name)


if __name__ == "__main__":
    main()
