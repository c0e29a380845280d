"""Configuration as a user meets it: the real binary, its flags, its
ARQONBUS_* environment and a YAML file (docs/configuration.md).

What a user observes: --version and --help answer and exit 0; anything
unknown or invalid stops the start with exit code 2 and one line on stderr,
"arqonbus: <problem>", that names the flag, variable, key or port; a setting
given in several places takes the value of the strongest source (file <
environment < flag), which the port the server really listens on proves;
and the log settings change what appears on stderr.

These tests start the binary themselves instead of through the Server
fixture, because the fixture always passes --port and friends as flags,
which would hide the file and the environment. Each process is killed in a
finally; one that ran must exit 0 without a sanitizer report.
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

import pytest

from conftest import BIN, ROOT, SLOW, free_port, wait_port
from rawws import RawWS

# Every setting's flag, in the order of --help (the table in src/config.c).
SETTING_FLAGS = [
    "--host", "--http-host", "--port", "--telemetry-port", "--http-port", "--tls-cert", "--tls-key",
    "--tls-min-version", "--log-level", "--log-format",
    "--max-message-size", "--max-header-size", "--handshake-timeout", "--heartbeat-interval",
    "--heartbeat-timeout", "--close-timeout", "--max-connections", "--max-connections-per-ip",
    "--max-handshakes-per-ip", "--rate-limit-messages",
    "--rate-limit-bytes", "--rate-limit-close-after", "--max-subscriptions", "--max-channels-per-client", "--max-channels", "--max-rooms",
    "--allowed-origins", "--max-outbound-queue",
    "--write-timeout", "--drain-timeout", "--max-envelope-size", "--max-malformed", "--history-size",
    "--history-max-limit", "--channel-ttl", "--bootstrap-channels", "--admins", "--auth", "--api-keys",
    "--api-keys-file", "--jwt-algorithm", "--jwt-secret", "--jwt-key-file", "--jwt-audience", "--jwt-issuer",
    "--jwt-leeway", "--command-roles", "--protected-rooms", "--ops-token", "--telemetry-channel",
    "--dashboard-channel", "--telemetry-stats-interval", "--telemetry-queue", "--stats-log-interval",
    "--redis-url", "--redis-timeout", "--redis-strict", "--redis-buffer-messages", "--redis-buffer-bytes",
    "--history-max-age", "--node-id", "--node-ttl",
]
SANITIZER = re.compile(r"(AddressSanitizer|LeakSanitizer|runtime error)")
LOGFMT_LINE = re.compile(r'^time=(\S+) level=(\w+) component=(\w+) msg=("(?:[^"\\]|\\.)*"|\S+)')
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def clean_env(extra=None):
    """The test's environment without any ARQONBUS_* variable (the binary
    refuses unknown ones, and ARQONBUS_BIN is one), plus 'extra'."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env.update(extra or {})
    return env


def distinct_ports(n):
    ports = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def run_to_exit(args, env=None, cwd=None, timeout=None):
    """Runs the binary, which is expected to exit on its own; returns
    (exit code, stdout, stderr). A process still running at the timeout is
    killed and the test fails."""
    proc = subprocess.Popen([BIN] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=clean_env(env), cwd=cwd or tempfile.gettempdir())
    try:
        out, err = proc.communicate(timeout=timeout or 10 * SLOW)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("arqonbus %r did not exit:\nstdout:\n%s\nstderr:\n%s" % (args, out.decode(), err.decode()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def assert_refused(args, env=None, names=()):
    """The start is refused: exit 2, nothing on stdout, exactly one line on
    stderr, "arqonbus: ..." naming each of 'names'. Returns the line."""
    code, out, err = run_to_exit(args, env)
    assert not SANITIZER.search(err), err
    lines = err.splitlines()
    assert code == 2, "exit %r, stderr:\n%s" % (code, err)
    assert out == "", out
    assert len(lines) == 1, "want one line on stderr, got:\n%s" % err
    line = lines[0]
    assert line.startswith("arqonbus: "), line
    for name in names:
        assert name in line, "%r does not name %r" % (line, name)
    return line


class Bus:
    """One arqonbus process started with exactly 'args' and 'env', its stdout
    and stderr in separate files of 'tmpdir'. stop() always leaves no
    process behind."""

    def __init__(self, tmpdir, args=(), env=None):
        self.tmpdir = tmpdir
        self.args = list(args)
        self.env = clean_env(env)
        self.proc = None
        self.returncode = None
        tag = "%d-%d" % (os.getpid(), time.monotonic_ns())
        self.out_path = os.path.join(tmpdir, "stdout-%s.log" % tag)
        self.err_path = os.path.join(tmpdir, "stderr-%s.log" % tag)

    def start(self, wait_for):
        """Starts the process and waits until every port in 'wait_for' listens."""
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([BIN] + self.args, stdout=out, stderr=err, cwd=self.tmpdir, env=self.env)
        for port in wait_for:
            if not wait_port(port, 10 * SLOW):
                self.stop(check=False)
                raise AssertionError("arqonbus did not listen on %d:\n%s" % (port, self.logs()))
        return self

    def wait_exit(self):
        """Waits for a process that was already told to stop (a second
        SIGTERM would mean "drop everything now")."""
        try:
            self.proc.wait(20 * SLOW)
        except subprocess.TimeoutExpired:
            raise AssertionError("arqonbus did not exit after SIGTERM:\n" + self.logs())

    def stop(self, check=True):
        """SIGTERM, then SIGKILL if it lingers. With 'check', the process must
        have exited 0 without a sanitizer report."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20 * SLOW)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.returncode = self.proc.returncode
            self.proc = None
        if check:
            assert self.returncode == 0, "arqonbus exited with %r:\n%s" % (self.returncode, self.logs())
            assert not SANITIZER.search(self.stderr()), self.logs()
        return self.returncode

    def _read(self, path):
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stdout(self):
        return self._read(self.out_path)

    def stderr(self):
        return self._read(self.err_path)

    def logs(self):
        return "--- stdout ---\n%s--- stderr ---\n%s" % (self.stdout(), self.stderr())


@pytest.fixture
def workdir():
    """A fresh temporary directory (the processes' working directory)."""
    path = tempfile.mkdtemp(prefix="arqonbus-config-")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


@pytest.fixture
def bus(request, workdir):
    """Factory: bus(args, env, wait_for) -> a started Bus. Whatever the test
    did, every process is gone after it; when the test failed, each one's
    output is printed."""
    started = []

    def factory(args=(), env=None, wait_for=()):
        b = Bus(workdir, args, env)
        started.append(b)
        return b.start(wait_for)

    yield factory
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for b in started:
        b.stop(check=False)
        if failed:
            print("\n----- arqonbus %r -----\n%s" % (b.args, b.logs()))


def write_yaml(tmpdir, text, name="arqonbus.yaml"):
    path = os.path.join(tmpdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def is_listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
        return r.status, r.read()


# ---- --version and --help -----------------------------------------------------

def project_version():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        return re.search(r"project\(arqonbus VERSION (\S+)", f.read()).group(1)


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_version_and_exits_0(flag):
    code, out, err = run_to_exit([flag])
    assert code == 0, err
    assert err == ""
    assert re.fullmatch(r"arqonbus %s \(protocol \d+\.\d+, git \S+, \w+ build\)\n" % re.escape(project_version()),
                        out), out


def test_version_answers_even_when_the_rest_would_not_load():
    code, out, err = run_to_exit(["--nope", "--port", "0", "--version"], env={"ARQONBUS_NOPE": "1"})
    assert code == 0, err
    assert out.startswith("arqonbus %s " % project_version()), out
    assert err == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_flag_and_exits_0(flag):
    code, out, err = run_to_exit([flag])
    assert code == 0, err
    assert err == ""
    assert out.startswith("Usage: arqonbus ")
    listed = re.findall(r"^  (--[a-z-]+) [A-Z]+ +ARQONBUS_[A-Z_]+$", out, re.M)
    assert listed == ["--config"] + SETTING_FLAGS, listed
    for flag_ in SETTING_FLAGS:
        var = "ARQONBUS_" + flag_[2:].replace("-", "_").upper()
        assert re.search(r"^  %s \S+ +%s\n      .+\n      default \S+" % (flag_, var), out, re.M), flag_
    assert re.search(r"^  -h, --help ", out, re.M)
    assert re.search(r"^  -V, --version ", out, re.M)


def test_help_answers_despite_bad_settings():
    code, out, err = run_to_exit(["--port", "nope", "--help"], env={"ARQONBUS_NOPE": "1"})
    assert code == 0, err
    assert out.startswith("Usage: arqonbus ")


# ---- refused starts -------------------------------------------------------------

def test_unknown_flag_exits_2_naming_it():
    line = assert_refused(["--port", str(free_port()), "--no-such-flag=1"], names=["--no-such-flag"])
    assert line == "arqonbus: config: unknown flag '--no-such-flag' (see --help)"


def test_unknown_env_var_exits_2_naming_it():
    line = assert_refused([], env={"ARQONBUS_NOPE": "1"}, names=["ARQONBUS_NOPE"])
    assert line == "arqonbus: config: unknown environment variable ARQONBUS_NOPE"


def test_unknown_yaml_key_exits_2_naming_it(workdir):
    path = write_yaml(workdir, "port: %d\nno_such_key: 1\n" % free_port())
    line = assert_refused(["--config", path], names=["no_such_key"])
    assert line == "arqonbus: config: unknown key 'no_such_key' in %s (line 2)" % path


def test_yaml_that_is_not_a_mapping_exits_2(workdir):
    path = write_yaml(workdir, "- port: 9100\n")
    line = assert_refused(["--config", path], names=[path])
    assert line.endswith("must be a mapping of keys to values, like 'port: 9100' (line 1)"), line


def test_missing_config_file_exits_2(workdir):
    path = os.path.join(workdir, "absent.yaml")
    assert_refused([], env={"ARQONBUS_CONFIG": path}, names=[path, "No such file or directory"])


SIZE_UNITS = " (a number of bytes, or with B, KiB, MiB, GiB)"
DURATION_UNITS = " (a number with ms, s or m; a bare number is seconds)"


@pytest.mark.parametrize("source,key,value,origin,expected", [
    ("flag", "port", "abc", "--port", "a port number 1-65535"),
    ("flag", "port", "65536", "--port", "a port number 1-65535"),
    ("flag", "heartbeat_interval", "1h", "--heartbeat-interval", "a duration 0-60m" + DURATION_UNITS),
    ("env", "max_message_size", "1XB", "ARQONBUS_MAX_MESSAGE_SIZE", "a size 125B-64MiB" + SIZE_UNITS),
    ("env", "host", "localhost", "ARQONBUS_HOST", "an IPv4 or IPv6 address"),
    ("file", "log_level", "loud", None, "debug, info, warn, error or off"),
    ("file", "max_connections", "0", None, "a whole number 1-1000000"),
])
def test_bad_value_exits_2_naming_the_key(workdir, source, key, value, origin, expected):
    args, env = [], {}
    if source == "flag":
        args = [origin, value]
    elif source == "env":
        env = {origin: value}
    else:
        path = write_yaml(workdir, "# settings\n%s: %s\n" % (key, value))
        args = ["--config", path]
        origin = "%s:2" % path
    line = assert_refused(args, env, names=[key])
    assert line == "arqonbus: config: invalid value '%s' for %s (%s): expected %s" % (value, key, origin, expected)


def test_equal_ports_exit_2_naming_both():
    p = free_port()
    line = assert_refused(["--port", str(p), "--http-port", str(p)], names=["port", "http_port", str(p)])
    assert line == "arqonbus: config: port and http_port are both %d; the three ports must differ" % p


@pytest.mark.parametrize("key,flag", [("port", "--port"), ("telemetry_port", "--telemetry-port"),
                                      ("http_port", "--http-port")])
def test_port_in_use_exits_2_naming_the_port(key, flag):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        ports = {k: p for k, p in zip(("port", "telemetry_port", "http_port"), distinct_ports(3))}
        ports[key] = port
        args = ["--host", "127.0.0.1", "--port", str(ports["port"]), "--telemetry-port",
                str(ports["telemetry_port"]), "--http-port", str(ports["http_port"])]
        code, out, err = run_to_exit(args)
        assert code == 2, "exit %r:\n%s%s" % (code, out, err)
        assert not SANITIZER.search(err), err
        problems = [l for l in err.splitlines() if l.startswith("arqonbus: ")]
        assert problems == ["arqonbus: %s %d is already in use (127.0.0.1:%d)" % (key, port, port)], err
        # Anything else on stderr is a log line (a warning, at most).
        assert all(LOGFMT_LINE.match(l) for l in err.splitlines() if not l.startswith("arqonbus: ")), err
        assert "is running" not in out, out
    finally:
        taken.close()


# ---- precedence -------------------------------------------------------------------

@pytest.mark.parametrize("sources", ["file", "file+env", "file+env+flag", "env+flag"])
def test_precedence_file_env_flag_decides_the_port(bus, workdir, sources):
    """file < environment < flag, seen from outside: the bus listens on the
    port of the strongest source and on none of the others."""
    p_file, p_env, p_flag, telemetry, http = distinct_ports(5)
    # The file also sets the other two ports, which no other source touches.
    path = write_yaml(workdir, "port: %d\ntelemetry_port: %d\nhttp_port: %d\n" % (p_file, telemetry, http))
    args, env = [], {}
    if "file" in sources:
        args += ["--config", path]
    else:
        args += ["--telemetry-port", str(telemetry), "--http-port", str(http)]
    if "env" in sources:
        env["ARQONBUS_PORT"] = str(p_env)
    if "flag" in sources:
        args += ["--port", str(p_flag)]
    want = p_flag if "flag" in sources else p_env if "env" in sources else p_file

    b = bus(args, env, wait_for=(want, telemetry, http))
    for p in (p_file, p_env, p_flag):
        if p != want:
            assert not is_listening(p), "also listening on %d:\n%s" % (p, b.logs())
    status, body = http_get(http, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    with RawWS(want) as ws:
        assert ws.status == 101
    assert re.search(r"msg=listening .*\bport=%d\b" % want, b.stderr()), b.logs()
    b.stop()


def test_config_flag_beats_config_variable(bus, workdir):
    p_var, p_flag, telemetry, http = distinct_ports(4)
    by_var = write_yaml(workdir, "port: %d\ntelemetry_port: %d\nhttp_port: %d\n" % (p_var, telemetry, http),
                        name="by-var.yaml")
    by_flag = write_yaml(workdir, "port: %d\ntelemetry_port: %d\nhttp_port: %d\n" % (p_flag, telemetry, http),
                         name="by-flag.yaml")
    b = bus(["--config", by_flag], {"ARQONBUS_CONFIG": by_var}, wait_for=(p_flag, telemetry, http))
    assert not is_listening(p_var)
    b.stop()
    b = bus([], {"ARQONBUS_CONFIG": by_var}, wait_for=(p_var, telemetry, http))
    assert not is_listening(p_flag)
    b.stop()


# ---- logging ----------------------------------------------------------------------

def ports_args():
    port, telemetry, http = distinct_ports(3)
    return port, ["--port", str(port), "--telemetry-port", str(telemetry), "--http-port", str(http)]


def shutdown_with_client(b, port):
    """Connects a client, stops the server with SIGTERM while it is connected
    (the server closes it with 1001), and waits for the exit."""
    with RawWS(port) as ws:
        b.proc.send_signal(signal.SIGTERM)
        code, _ = ws.expect_close(timeout=10 * SLOW)
        assert code == 1001
        ws.wait_eof(timeout=10 * SLOW)
    b.wait_exit()
    b.stop()


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_log_format_json_writes_json_lines_to_stderr(bus, workdir, source):
    port, args = ports_args()
    env = {}
    if source == "flag":
        args += ["--log-format", "json"]
    elif source == "env":
        env["ARQONBUS_LOG_FORMAT"] = "json"
    else:
        args += ["--config", write_yaml(workdir, "log_format: json\n")]
    b = bus(args, env, wait_for=(port,))
    shutdown_with_client(b, port)

    lines = b.stderr().splitlines()
    assert lines, b.logs()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail("not a JSON line on stderr: %r\n%s" % (line, b.logs()))
    for r in records:
        assert list(r)[:4] == ["time", "level", "component", "msg"], r
        assert ISO_MS.match(r["time"]), r
        assert r["level"] in ("debug", "info", "warn", "error"), r
        assert isinstance(r["component"], str) and r["component"], r
    listening = [r for r in records if r["msg"] == "listening"]
    assert len(listening) == 1 and listening[0]["component"] == "server", records
    assert listening[0]["level"] == "info" and listening[0]["port"] == port, listening
    assert any(r["msg"] == "client connected" and r["component"] == "net" for r in records), records
    assert records[-1]["msg"] == "stopped", records
    # stdout keeps the human banner; the logs do not go there.
    assert "is running" in b.stdout(), b.stdout()
    assert not any(line.startswith("{") for line in b.stdout().splitlines()), b.stdout()


def log_levels(stderr):
    """The level of each logfmt line of 'stderr' (every line must be one)."""
    levels = []
    for line in stderr.splitlines():
        m = LOGFMT_LINE.match(line)
        assert m, "not a logfmt log line: %r" % line
        assert ISO_MS.match(m.group(1)), line
        levels.append(m.group(2))
    return levels


def test_log_level_debug_vs_warn_changes_output(bus):
    port, args = ports_args()
    b = bus(args + ["--log-level", "debug"], wait_for=(port,))
    shutdown_with_client(b, port)
    debug_levels = log_levels(b.stderr())
    assert "debug" in debug_levels, b.stderr()
    assert "info" in debug_levels, b.stderr()
    assert "msg=listening" in b.stderr()

    port, args = ports_args()
    b = bus(args, {"ARQONBUS_LOG_LEVEL": "warn"}, wait_for=(port,))
    shutdown_with_client(b, port)
    warn_levels = log_levels(b.stderr())
    assert set(warn_levels) <= {"warn", "error"}, b.stderr()
    assert "msg=listening" not in b.stderr()
    # The server did run and serve in both: the banner is on stdout.
    assert "is running" in b.stdout()


def test_log_level_default_is_info(bus):
    port, args = ports_args()
    b = bus(args, wait_for=(port,))
    shutdown_with_client(b, port)
    levels = log_levels(b.stderr())
    assert "info" in levels and "debug" not in levels, b.stderr()


# ---- docs/configuration.md ----------------------------------------------------------

def help_rows():
    """{flag: (variable, default)} from --help."""
    code, out, _ = run_to_exit(["--help"])
    assert code == 0
    rows = {}
    for flag, var, default in re.findall(r"^  (--[a-z-]+) \S+ +(ARQONBUS_[A-Z_]+)\n      .*\n      default (.+?)(?:, range .*)?$",
                                         out, re.M):
        rows[flag] = (var, default)
    return rows


def test_configuration_doc_matches_help():
    """docs/configuration.md lists exactly the settings --help lists, with the
    same variable, flag and default (its table, one row per key)."""
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        doc = f.read()
    documented = {}
    for key, var, flag, default in re.findall(r"^\| `([a-z_]+)` \| `(ARQONBUS_[A-Z_]+)` \| `(--[a-z-]+)` \| `([^`]*)` \|",
                                              doc, re.M):
        assert flag == "--" + key.replace("_", "-"), key
        documented[flag] = (var, default)
    assert documented == help_rows()
    assert list(documented) == SETTING_FLAGS
