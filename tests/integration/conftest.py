"""Fixtures that start the real arqonbus binary on free ports.

Every test talks to a real server process: it is started in a temporary
directory on free ports, waited for until it listens, and always stopped in
a finally. On stop it must exit 0 (a sanitizer report or a leak makes the
ASan build exit non-zero, which fails the test). When a test fails, the
server's log is printed.

ARQONBUS_BIN names the binary (default: build/release/arqonbus);
ARQONBUS_SANITIZED=1 says it was built with ASan+UBSan (longer timeouts).
"""
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import urllib.error

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("ARQONBUS_BIN", os.path.join(ROOT, "build", "release", "arqonbus"))
SANITIZED = os.environ.get("ARQONBUS_SANITIZED") == "1"
SLOW = 3.0 if SANITIZED else 1.0


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n):
    """Returns 'n' distinct free ports (all bound at once while choosing)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port, timeout, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Server:
    """One arqonbus process. Use as a context manager or call start/stop."""

    def __init__(self, tmpdir, args=(), env=None, config=None):
        self.tmpdir = tmpdir
        self.port, self.telemetry_port, self.http_port = free_ports(3)
        self.args = list(args)
        self.env = dict(env or {})
        self.config = config
        self.proc = None
        self.log_path = os.path.join(tmpdir, "server-%d.log" % self.port)
        self.returncode = None
        self.tls = None  # an ssl.SSLContext: the ops port is then asked over https

    @property
    def url(self):
        return "ws://127.0.0.1:%d" % self.port

    @property
    def telemetry_url(self):
        return "ws://127.0.0.1:%d" % self.telemetry_port

    def command(self):
        cmd = [BIN, "--host", "127.0.0.1", "--port", str(self.port),
               "--telemetry-port", str(self.telemetry_port),
               "--http-port", str(self.http_port)]
        if self.config is not None:
            path = os.path.join(self.tmpdir, "arqonbus-%d.yaml" % self.port)
            with open(path, "w") as f:
                f.write(self.config)
            cmd += ["--config", path]
        return cmd + self.args

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
        env.update(self.env)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        self.logfile = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self.logfile, stderr=subprocess.STDOUT,
                                     cwd=self.tmpdir, env=env)
        http_host = self.args[self.args.index("--http-host") + 1] if "--http-host" in self.args else "127.0.0.1"
        for port, host in ((self.port, "127.0.0.1"), (self.telemetry_port, "127.0.0.1"), (self.http_port, http_host)):
            if not wait_port(port, 10 * SLOW, host):
                self.stop(check=False)
                raise RuntimeError("arqonbus did not start listening:\n" + self.log())
        return self

    def stop(self, check=True, sig=signal.SIGTERM, timeout=None):
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout or 20 * SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if check:
                    raise AssertionError("arqonbus did not stop on SIGTERM:\n" + self.log())
        self.returncode = self.proc.returncode
        self.proc = None
        self.logfile.close()
        if check:
            log = self.log()
            assert self.returncode == 0, "arqonbus exited with %r:\n%s" % (self.returncode, log)
            assert not re.search(r"(AddressSanitizer|LeakSanitizer|runtime error)", log), log
        return self.returncode

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def http(self, path, method="GET", timeout=5):
        """Returns (status, headers, body bytes) of a request on the ops port."""
        scheme = "https" if self.tls else "http"
        req = urllib.request.Request("%s://127.0.0.1:%d%s" % (scheme, self.http_port, path), method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.tls) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def metrics(self):
        """Returns the /metrics exposition as {'name{labels}': value}."""
        status, _, body = self.http("/metrics")
        assert status == 200
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def wait_metric(self, key, predicate, timeout=5):
        """Polls /metrics until predicate(value) holds; returns the value."""
        deadline = time.monotonic() + timeout * SLOW
        value = None
        while time.monotonic() < deadline:
            value = self.metrics().get(key)
            if value is not None and predicate(value):
                return value
            time.sleep(0.05)
        raise AssertionError("metric %s never satisfied the condition (last %r)" % (key, value))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop(check=exc[0] is None)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def make_server(request):
    """Factory: make_server(args=[...], env={...}, config='yaml') -> started Server."""
    tmp = tempfile.mkdtemp(prefix="arqonbus-test-")
    servers = []

    def factory(**kw):
        s = Server(tmp, **kw)
        servers.append(s)
        return s.start()

    yield factory
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    errors = []
    for s in servers:
        try:
            s.stop(check=not failed)
        except AssertionError as e:
            errors.append(str(e))
        if failed:
            print("\n----- arqonbus log (port %d) -----\n%s" % (s.port, s.log()))
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def server(make_server):
    """A server with the default configuration."""
    return make_server()
