"""Protocol v1 helpers for the integration tests.

Every envelope a test receives from the server goes through check(), which
validates it against docs/server-envelope.schema.json (and through it
docs/envelope.schema.json): the published schema is the contract, so every
test checks it on everything the server sends.

Bus is a small synchronous client on a raw socket (rawws.RawWS) that speaks
envelopes: it reads the welcome on connect, sends dicts, and returns the next
envelope as a dict. Tests that need a third-party client use websockets or
Node's ws and call check() themselves.
"""
import json
import os
import socket
import time
import urllib.parse

import jsonschema

from rawws import OP_BINARY, OP_CLOSE, OP_TEXT, RawWS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    with open(os.path.join(ROOT, "docs", name)) as f:
        return json.load(f)


ENVELOPE_SCHEMA = _load("envelope.schema.json")
SERVER_SCHEMA = _load("server-envelope.schema.json")
_resolver = jsonschema.RefResolver.from_schema(
    SERVER_SCHEMA, store={ENVELOPE_SCHEMA["$id"]: ENVELOPE_SCHEMA, SERVER_SCHEMA["$id"]: SERVER_SCHEMA})
_server_validator = jsonschema.Draft202012Validator(SERVER_SCHEMA, resolver=_resolver)
_envelope_validator = jsonschema.Draft202012Validator(ENVELOPE_SCHEMA)

BOOTSTRAP = ["science:general", "science:explore", "science:hypothesize", "science:design", "science:execute",
             "science:interpret", "science:share"]


def check(env):
    """Asserts that 'env' (a dict, or JSON text) is an envelope the server may
    send, per the published schema. Returns the dict."""
    if isinstance(env, (bytes, str)):
        env = json.loads(env)
    errors = sorted(_server_validator.iter_errors(env), key=lambda e: list(e.path))
    assert not errors, "envelope does not match docs/server-envelope.schema.json: %s\n%s" % (
        "; ".join("%s: %s" % ("/".join(map(str, e.path)), e.message) for e in errors), json.dumps(env))
    return env


def valid_client_envelope(env):
    """True when 'env' is valid against docs/envelope.schema.json."""
    return _envelope_validator.is_valid(env)


def query(**params):
    """Builds '/?k=v&...' from keyword arguments (None values are left out)."""
    items = [(k, "true" if v is True else "false" if v is False else v) for k, v in params.items() if v is not None]
    return "/?" + urllib.parse.urlencode(items) if items else "/"


class Bus:
    """A protocol v1 client on a raw socket. Reads and checks the welcome."""

    def __init__(self, port, timeout=5.0, tls=None, headers=None, **params):
        extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
        self.ws = RawWS(port, timeout=timeout, path=query(**params), tls=tls, extra=extra)
        self.timeout = timeout
        self.welcome = self.recv()
        assert self.welcome["type"] == "system" and self.welcome["payload"]["event"] == "welcome", self.welcome
        self.id = self.welcome["payload"]["client_id"]
        self._n = 0

    def send(self, env):
        """Sends 'env' (a dict, or raw text/bytes) as one text frame."""
        data = env if isinstance(env, bytes) else env.encode() if isinstance(env, str) else json.dumps(env).encode()
        self.ws.send_frame(OP_TEXT, data)

    def send_binary(self, data):
        self.ws.send_frame(OP_BINARY, data)

    def recv(self, timeout=None):
        """Returns the next envelope (checked against the schema)."""
        self.ws.sock.settimeout(timeout or self.timeout)
        op, payload = self.ws.recv_message()
        assert op == OP_TEXT, "expected a text frame, got opcode %r: %r" % (op, payload[:200])
        return check(payload)

    def recv_until(self, pred, timeout=None, limit=1000):
        """Returns the first envelope for which pred(env) holds, and the list of
        the envelopes skipped before it."""
        skipped = []
        for _ in range(limit):
            env = self.recv(timeout)
            if pred(env):
                return env, skipped
            skipped.append(env)
        raise AssertionError("no matching envelope in %d" % limit)

    def expect_nothing(self, wait=0.2):
        """Asserts that no data message arrives within 'wait' seconds."""
        self.ws.sock.settimeout(wait)
        try:
            op, payload = self.ws.recv_message()
        except socket.timeout:
            return
        raise AssertionError("unexpected message: %r" % payload[:300])

    def command(self, name, env_fields=None, **payload):
        """Sends a command with a fresh id and returns its reply (or error),
        skipping other envelopes. 'env_fields' go to the top level."""
        self._n += 1
        cid = "arq_t%s_%d" % (self.id.replace(".", "_").replace("@", "_"), self._n)
        env = {"type": "command", "id": cid, "command": name}
        env.update(env_fields or {})
        if payload:
            env["payload"] = payload
        self.send(env)
        reply, self.skipped = self.recv_until(lambda e: e.get("correlation_id") == cid)
        return reply

    def join(self, channel):
        room, ch = channel.split(":")
        reply = self.command("join_channel", {"room": room, "channel": ch})
        assert reply["type"] == "system", reply
        return reply

    def expect_close(self, timeout=None):
        return self.ws.expect_close(timeout or self.timeout)

    def close(self):
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def error_code(env):
    assert env["type"] == "error", env
    return env["payload"]["code"]


def close_of(ws, timeout=5.0):
    """Reads the RawWS 'ws' up to the server's close frame; every data message
    before it is checked as an envelope. Returns (code, reason)."""
    skipped = []
    code, reason = ws.expect_close(timeout, skipped)
    for op, payload in skipped:
        assert op == OP_TEXT, (op, payload[:200])
        check(payload)
    return code, reason
