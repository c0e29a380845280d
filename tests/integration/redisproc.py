"""A throwaway redis-server for the integration tests (Debian's package).

RedisServer(tmpdir).start() runs redis-server on a free port in 'tmpdir'
(no persistence unless asked), waits until it answers PING, and stop() ends
it. kill() sends SIGKILL, pause()/resume() SIGSTOP/SIGCONT, restart() starts
it again on the same port. With appendonly=True and appendfsync="always",
every write Redis answered survives a SIGKILL: start() again (same port,
same directory) loads it back. entries() reads a channel's stream with
redis-py, decoded.
"""
import os
import signal
import socket
import subprocess
import time

from conftest import free_port

REDIS = "/usr/bin/redis-server"


def ping(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, tmpdir, appendonly=False, appendfsync=None):
        assert os.path.exists(REDIS), "redis-server is missing: make deps installs Debian's redis-server"
        self.tmpdir = tmpdir
        self.port = free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc = None
        self.log = None

    @property
    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    def start(self, timeout=10):
        args = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.tmpdir, "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no", "--loglevel", "warning"]
        if self.appendfsync:
            args += ["--appendfsync", self.appendfsync]
        if self.log:
            self.log.close()
        self.log = open(os.path.join(self.tmpdir, "redis-%d.log" % self.port), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ping(self.port):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start on port %d" % self.port)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def restart(self):
        if self.proc and self.proc.poll() is None:
            self.kill()
        return self.start()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
            self.log = None

    def entries(self, channel):
        """The stream of 'channel' ("room:channel") as [(stream id, {field: value})],
        oldest first, decoded as UTF-8."""
        import redis as redis_py
        room, ch = channel.split(":")
        r = redis_py.Redis(host="127.0.0.1", port=self.port)
        try:
            raw = r.xrange("arqon:room:%s:channel:%s" % (room, ch))
        finally:
            r.close()
        return [(sid.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for sid, fields in raw]
