"""Authentication and authorization (docs/security.md).

The real server runs with auth jwt (HS256 with a secret, RS256 and ES256
with public keys the tests generate) or auth api_key. Tokens are made with
Debian's python3-jwt (PyJWT), an independent implementation, and hostile
ones by hand. For every refusal the test checks what a client sees (HTTP
401 or 403 at the upgrade and no WebSocket, or a forbidden error envelope),
that it is counted in /metrics, and that a legitimate client connected at
the same time keeps working.
"""
import base64
import hashlib
import hmac
import json
import os
import socket
import time

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import SLOW
from envelopes import Bus, close_of, error_code
from rawws import RawWS, upgrade_request

SECRET = "s3cret-for-tests-0123456789abcdef-XYZ"  # 36 bytes
AUD, ISS = "arqonbus-tests", "https://issuer.example"


def token(sub="alice", secret=SECRET, alg="HS256", exp_in=300, headers=None, **claims):
    """A signed token for 'sub' valid for 'exp_in' seconds (None: no exp)."""
    now = int(time.time())
    body = {"sub": sub, "iat": now, "aud": AUD, "iss": ISS}
    if exp_in is not None:
        body["exp"] = now + exp_in
    if sub is None:
        del body["sub"]
    body.update(claims)
    return pyjwt.encode(body, secret, algorithm=alg, headers=headers)


def b64(obj):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_token(header, claims, key=SECRET.encode(), digest=hashlib.sha256, signature=None):
    """A token built by hand: any header, HMAC signature unless given."""
    signing = b64(header) + "." + b64(claims)
    if signature is None:
        signature = b64(hmac.new(key, signing.encode(), digest).digest())
    return signing + "." + signature


def upgrade(port, path="/", headers=None):
    """Sends an upgrade request; returns (status, headers, body) of the answer
    and whether the server then closed the connection."""
    extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
    ws = RawWS(port, upgrade=False)
    req, _ = upgrade_request(path=path, extra=extra)
    ws.sock.sendall(req)
    status, hdrs, body = ws.read_http_response()
    ws.sock.settimeout(5 * SLOW)
    try:
        rest = ws.sock.recv(100)
    except (ConnectionResetError, socket.timeout):
        rest = b"?"
    ws.sock.close()
    return status, hdrs, body.decode(), rest == b""


def bearer(tok):
    return {"Authorization": "Bearer " + tok}


def jwt_server(make_server, *extra):
    return make_server(args=["--auth", "jwt", "--jwt-secret", SECRET, "--jwt-audience", AUD, "--jwt-issuer", ISS,
                             "--jwt-leeway", "2s"] + list(extra))


def alive(bus):
    """The legitimate client still works: a ping is answered."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply


def refused(port, tok=None, headers=None, path="/", status=401, reason=None):
    """Asserts that an upgrade with bearer 'tok' gets 'status', no WebSocket,
    and (when given) 'reason' in the body. Returns the body."""
    h = dict(headers or {})
    if tok is not None:
        h.update(bearer(tok))
    code, hdrs, body, closed = upgrade(port, path, h)
    assert code == status, (code, body)
    assert "sec-websocket-accept" not in hdrs and closed, hdrs
    if status == 401:
        assert hdrs["www-authenticate"].startswith('Bearer realm="arqonbus"'), hdrs
    if reason:
        assert reason in body, body
    if tok:
        assert tok not in body
    return body


# ---- JWT: accepted ---------------------------------------------------------


def test_a_valid_token_names_the_client_in_the_header_query_or_subprotocol(make_server):
    srv = jwt_server(make_server)
    tok = token("alice", roles=["user"], client_type="ai-agent")
    a = Bus(srv.port, headers=bearer(tok))
    w = a.welcome["payload"]
    assert (w["client_id"], w["client_type"], w["roles"]) == ("alice", "ai-agent", ["user"]), w
    assert w["expires_at"].endswith("Z")
    b = Bus(srv.port, token=token("bob", roles="admin user"))
    assert (b.id, b.welcome["payload"]["roles"]) == ("bob", ["admin", "user"])
    # Browsers: the token as a subprotocol entry, next to "arqonbus", which
    # the server selects (it never echoes the token).
    c = Bus(srv.port, headers={"Sec-WebSocket-Protocol": "arqonbus, bearer." + token("carol")})
    assert c.ws.headers["sec-websocket-protocol"] == "arqonbus"
    assert c.id == "carol" and c.welcome["payload"]["roles"] == ["guest"]  # no roles claim: guest
    # The same client id in the query string is fine; another is refused.
    d = Bus(srv.port, headers=bearer(token("dave")), client_id="dave")
    assert d.id == "dave"
    refused(srv.port, token("eve"), path="/?client_id=mallory", status=403, reason="does not match")
    alive(a)
    m = srv.metrics()
    assert m['arqonbus_auth_total{result="ok"}'] == 5
    assert m['arqonbus_handshake_errors_total{status="403"}'] == 1


def test_rs256_and_es256_tokens_are_checked_with_a_public_key(make_server, tmp_path):
    for alg, key in (("RS256", rsa.generate_private_key(65537, 2048)), ("ES256", ec.generate_private_key(ec.SECP256R1()))):
        pub = tmp_path / ("%s.pem" % alg)
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        srv = make_server(args=["--auth", "jwt", "--jwt-algorithm", alg, "--jwt-key-file", str(pub)])
        a = Bus(srv.port, headers=bearer(token("alice", secret=key, alg=alg, roles=["user"])))
        assert a.id == "alice"
        other = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
        refused(srv.port, token("alice", secret=other, alg=alg), reason="signature")
        # Algorithm confusion: an HS256 token whose secret is the public key
        # the server holds.
        refused(srv.port, hand_token({"alg": "HS256", "typ": "JWT"}, {"sub": "x", "exp": time.time() + 60},
                                     key=pub.read_bytes()), reason="algorithm is not %s" % alg)
        alive(a)


# ---- JWT: refused ----------------------------------------------------------


def test_every_bad_token_gets_401_and_no_websocket(make_server):
    srv = jwt_server(make_server, "--max-header-size", "32KiB")  # room for an oversized token
    good = Bus(srv.port, headers=bearer(token("alice", roles=["user"])), channel="science:general")
    now = time.time()
    cases = [
        (token(exp_in=-60), "expired"),
        (token(nbf=int(now) + 3600), "not valid yet"),
        (token(iat=int(now) + 3600), "issued in the future"),
        (token()[:-4] + ("AAAA" if not token().endswith("AAAA") else "BBBB"), "signature"),  # forged signature
        (token(secret="another-secret-of-the-same-size-0123"), "signature"),  # wrong key
        (token(aud="someone-else"), "audience"),
        (token(iss="https://evil.example"), "issuer"),
        (hand_token({"alg": "none", "typ": "JWT"}, {"sub": "root", "exp": now + 60}, signature=""), None),
        (hand_token({"alg": "none"}, {"sub": "root", "exp": now + 60}, signature="x"), "algorithm is not HS256"),
        (token(alg="HS512"), "algorithm is not HS256"),
        (hand_token({"alg": "HS256", "crit": ["exp"]}, {"sub": "a", "exp": now + 60}), "crit"),
        (token(sub=None), "sub"),
        (token(exp_in=None), "exp"),
        (token(sub="not a valid id!"), "sub"),
        (token(roles=5), "roles"),
        (token(client_type="robot"), "client_type"),
        (token(rooms="science"), "rooms"),
        ("not.a-token", "not a signed JSON Web Token"),
        ("a" * 9000, "longer than"),
    ]
    for tok, reason in cases:
        refused(srv.port, tok, reason=reason)
        alive(good)
    # A token that is signed right but by hand, to show the checks are the
    # server's and not the library's: accepted.
    ok = hand_token({"alg": "HS256"}, {"sub": "zed", "exp": now + 60, "aud": [AUD, "x"], "iss": ISS})
    assert Bus(srv.port, headers=bearer(ok)).id == "zed"
    # No credential, and a credential of another scheme.
    body = refused(srv.port, reason="authentication required")
    code, hdrs, _, _ = upgrade(srv.port)
    assert hdrs["www-authenticate"] == 'Bearer realm="arqonbus"'
    refused(srv.port, headers={"Authorization": "Basic YWxpY2U6cHc="}, reason="Bearer")
    m = srv.metrics()
    assert m['arqonbus_auth_total{result="refused"}'] == len(cases) + 1
    assert m['arqonbus_auth_total{result="missing"}'] == 2
    assert m['arqonbus_handshake_errors_total{status="401"}'] == len(cases) + 3
    # The legitimate client's channel still works end to end.
    other = Bus(srv.port, headers=bearer(token("bob", roles=["user"])))
    other.send({"type": "event", "id": "arq_still", "room": "science", "channel": "general", "payload": {"k": 1}})
    env, _ = good.recv_until(lambda e: e["type"] == "event")
    assert env["id"] == "arq_still" and env["from"] == "bob"


def test_credentials_never_show_in_logs_metrics_or_status(make_server):
    srv = jwt_server(make_server)
    tok = token("alice", roles=["admin"])
    a = Bus(srv.port, token=tok)
    refused(srv.port, tok + "x")
    for path in ("/metrics", "/status"):
        status, _, body = srv.http(path)
        assert status == 200 and tok.encode() not in body and SECRET.encode() not in body
    alive(a)
    log = srv.log()
    assert tok not in log and SECRET not in log
    assert "handshake refused" in log and "signature" in log  # the reason is logged, the token is not


# ---- API keys ----------------------------------------------------------------


def keyline(key, cid, roles, ctype=None):
    h = hashlib.sha256(key.encode()).hexdigest()
    return ":".join([h, cid, roles] + ([ctype] if ctype else []))


def test_api_keys_from_the_config_and_a_file(make_server, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# service keys\n\n%s\n" % keyline("file-key-0123456789", "ingest", "user", "service"))
    srv = make_server(args=["--auth", "api_key", "--api-keys", keyline("admin-key-0123456789", "ops", "admin+user"),
                            "--api-keys-file", str(keyfile)])
    a = Bus(srv.port, headers=bearer("admin-key-0123456789"))
    assert (a.id, a.welcome["payload"]["roles"]) == ("ops", ["admin", "user"])
    assert "expires_at" not in a.welcome["payload"]  # keys do not expire
    s = Bus(srv.port, token="file-key-0123456789")
    assert (s.id, s.welcome["payload"]["client_type"], s.welcome["payload"]["roles"]) == ("ingest", "service",
                                                                                          ["user"])
    refused(srv.port, "file-key-012345678", reason="unknown API key")  # one character short
    refused(srv.port, "wrong", reason="unknown API key")
    alive(a)
    alive(s)
    assert srv.metrics()['arqonbus_auth_total{result="refused"}'] == 2


def test_sighup_reads_the_key_file_again(make_server, tmp_path):
    import signal
    keyfile = tmp_path / "keys"
    keyfile.write_text(keyline("old-key-0123456789", "svc", "user") + "\n")
    srv = make_server(args=["--auth", "api_key", "--api-keys-file", str(keyfile)])
    old = Bus(srv.port, token="old-key-0123456789")
    # Rotate: the new file replaces the old one whole (written, then renamed).
    (tmp_path / "keys.new").write_text(keyline("new-key-0123456789", "svc2", "user") + "\n")
    os.replace(tmp_path / "keys.new", keyfile)
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_metric('arqonbus_auth_reloads_total{result="ok"}', lambda v: v == 1)
    refused(srv.port, "old-key-0123456789", reason="unknown API key")
    assert Bus(srv.port, token="new-key-0123456789").id == "svc2"
    alive(old)  # admitted before the rotation: stays until it closes
    # A broken file: the keys in force stay, the failure is logged and counted.
    keyfile.write_text("not an entry\n")
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_metric('arqonbus_auth_reloads_total{result="failed"}', lambda v: v == 1)
    assert Bus(srv.port, token="new-key-0123456789").id == "svc2"
    assert "credentials reload failed" in srv.log()


@pytest.mark.parametrize("args, message", [
    (["--auth", "api_key"], "no API key is configured"),
    (["--auth", "api_key", "--api-keys", "abc:me:user"], "64 hex digits"),
    (["--auth", "api_key", "--api-keys", "%s:me:root" % ("0" * 64)], "roles must be"),
    (["--auth", "jwt"], "no key is configured"),
    (["--auth", "jwt", "--jwt-secret", "short"], "at least 32 bytes"),
    (["--auth", "jwt", "--jwt-algorithm", "RS256", "--jwt-secret", SECRET], "needs jwt_key_file"),
    (["--protected-rooms", "ops"], "protected_rooms entry"),
    (["--command-roles", "shutdown=admin"], "command_roles entry"),
])
def test_bad_auth_settings_stop_the_start(args, message):
    import subprocess
    from conftest import BIN
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    p = subprocess.run([BIN] + args, capture_output=True, text=True, timeout=20 * SLOW, env=env)
    assert p.returncode == 2 and message in p.stderr, (p.returncode, p.stderr)


# ---- authorization -------------------------------------------------------------


def test_roles_protected_rooms_and_guests(make_server):
    srv = jwt_server(make_server, "--protected-rooms", "ops=user,vault=admin")
    admin = Bus(srv.port, headers=bearer(token("root", roles=["admin"])))
    user = Bus(srv.port, headers=bearer(token("ursula", roles=["user"])))
    guest = Bus(srv.port, headers=bearer(token("gus")))
    scoped = Bus(srv.port, headers=bearer(token("sam", roles=["user"], rooms=["vault", "lab"])))
    listener = Bus(srv.port, headers=bearer(token("lena", roles=["user"])), channel="lab:bench")

    def forbidden(reply, command=None):
        assert error_code(reply) == "forbidden", reply
        if command:
            assert reply["command"] == command, reply
        return reply["payload"]["message"]

    # Commands: delete_channel and create_channel are for admins.
    assert "not open to your roles" in forbidden(user.command("delete_channel", {"room": "lab", "channel": "bench"}),
                                                 "delete_channel")
    forbidden(guest.command("create_channel", {"room": "lab", "channel": "new"}), "create_channel")
    assert admin.command("create_channel", {"room": "lab", "channel": "new"})["type"] == "system"
    # A protected room: users (listed) and admins may; guests may not.
    assert user.command("join_channel", {"room": "ops", "channel": "alerts"})["type"] == "system"
    assert "not open" in forbidden(guest.command("join_channel", {"room": "ops", "channel": "alerts"}),
                                   "join_channel")
    forbidden(guest.command("history", {"room": "ops", "channel": "alerts"}), "history")
    forbidden(user.command("join_channel", {"room": "vault", "channel": "x"}), "join_channel")
    assert admin.command("join_channel", {"room": "vault", "channel": "x"})["type"] == "system"
    # A token's rooms claim opens a protected room, and limits the client to its rooms.
    assert scoped.command("join_channel", {"room": "vault", "channel": "x"})["type"] == "system"
    forbidden(scoped.command("join_channel", {"room": "science", "channel": "general"}))
    scoped.send({"type": "event", "id": "arq_out", "room": "science", "channel": "general", "payload": {}})
    assert error_code(scoped.recv()) == "forbidden"
    # list_channels leaves out the rooms a client may not use.
    rooms = {c["room"] for c in guest.command("list_channels")["payload"]["channels"]}
    assert "ops" not in rooms and "vault" not in rooms and "lab" in rooms
    rooms = {c["room"] for c in scoped.command("list_channels")["payload"]["channels"]}
    assert rooms <= {"vault", "lab"}
    # Guests read but do not publish.
    assert guest.command("join_channel", {"room": "lab", "channel": "bench"})["type"] == "system"
    for env in ({"type": "event", "room": "lab", "channel": "bench", "payload": {}},
                {"type": "private", "to": ["lena"], "payload": {}},
                {"type": "telemetry", "eventType": "x", "payload": {}}):
        guest.send(dict(env, id="arq_g_" + env["type"]))
        reply, _ = guest.recv_until(lambda e: e["type"] == "error")
        assert error_code(reply) == "forbidden" and reply["correlation_id"] == "arq_g_" + env["type"], reply
    user.send({"type": "event", "id": "arq_ok", "room": "lab", "channel": "bench", "payload": {"n": 1}})
    for who in (listener, guest):
        env, _ = who.recv_until(lambda e: e["type"] == "event")
        assert env["id"] == "arq_ok"
    # An initial channel in a room the client may not use is not joined.
    g2 = Bus(srv.port, headers=bearer(token("gil")), channel="ops:alerts")
    assert g2.welcome["payload"]["subscriptions"] == []
    err = g2.recv()
    assert error_code(err) == "forbidden" and "was not joined" in err["payload"]["message"]
    m = srv.metrics()
    assert m['arqonbus_forbidden_total{action="command"}'] == 2
    assert m['arqonbus_forbidden_total{action="room"}'] == 6
    assert m['arqonbus_forbidden_total{action="publish"}'] == 3
    log = srv.log()
    assert 'msg=forbidden client_id=gus' in log and "action=publish" in log


def test_default_roles_without_authentication(make_server):
    """auth none: the admins setting decides who is admin; protected rooms
    still hold."""
    srv = make_server(args=["--admins", "boss", "--protected-rooms", "ops=admin"])
    assert "authentication is off" in srv.log()
    boss = Bus(srv.port, client_id="boss")
    joe = Bus(srv.port, client_id="joe")
    assert boss.welcome["payload"]["roles"] == ["admin", "user"] and joe.welcome["payload"]["roles"] == ["user"]
    assert error_code(joe.command("join_channel", {"room": "ops", "channel": "a"})) == "forbidden"
    assert boss.command("join_channel", {"room": "ops", "channel": "a"})["type"] == "system"
    assert error_code(joe.command("authenticate", token="x")) == "invalid_argument"


# ---- telemetry port ------------------------------------------------------------


def test_the_telemetry_port_needs_an_admin_credential(make_server):
    srv = jwt_server(make_server)
    refused(srv.telemetry_port, reason="authentication required")
    refused(srv.telemetry_port, token("ursula", roles=["user"]), status=403, reason="admin")
    ws = RawWS(srv.telemetry_port, extra="Authorization: Bearer %s\r\n" % token("root", roles=["admin"]))
    assert ws.status == 101
    # A monitoring connection ends with its token too.
    short = RawWS(srv.telemetry_port, extra="Authorization: Bearer %s\r\n" % token("root", roles=["admin"],
                                                                                      exp_in=1))
    assert short.expect_close(10 * SLOW) == (4002, "token expired")
    assert ws.status == 101 and ws.sock.fileno() >= 0
    ws.close()


# ---- in-band refresh and expiry ---------------------------------------------------


def test_a_fresh_token_in_band_keeps_the_connection_and_expiry_closes_with_4002(make_server):
    srv = jwt_server(make_server, "--jwt-leeway", "0s", "--protected-rooms", "ops=admin")
    keeper = Bus(srv.port, headers=bearer(token("kim", exp_in=3, roles=["admin"])), channel="ops:room")
    lapser = Bus(srv.port, headers=bearer(token("lou", exp_in=3, roles=["user"])))
    # A refresh for another client, and a bad one: refused, the connection stays.
    reply = keeper.command("authenticate", token=token("lou", roles=["admin"]))
    assert error_code(reply) == "forbidden" and "for client" in reply["payload"]["message"]
    reply = keeper.command("authenticate", token=token("kim", exp_in=-60))
    assert error_code(reply) == "unauthorized" and "expired" in reply["payload"]["message"]
    # The fresh token drops admin: the protected room is left.
    reply = keeper.command("authenticate", token=token("kim", exp_in=600, roles=["user"]))
    assert reply["type"] == "system" and reply["command"] == "authenticate", reply
    p = reply["payload"]
    assert p["client_id"] == "kim" and p["roles"] == ["user"] and p["left"] == ["ops:room"], p
    code, reason = close_of(lapser.ws, 10 * SLOW)
    assert (code, reason) == (4002, "token expired")
    time.sleep(0.5)  # past the first token's expiry for sure (close_of waited for it)
    alive(keeper)
    lapser.close()
    srv.wait_metric('arqonbus_connections_closed_total{reason="token_expired"}', lambda v: v == 1)


# ---- the ops port ------------------------------------------------------------------


def test_ops_token_guards_everything_but_health(make_server):
    srv = make_server(args=["--ops-token", "ops-secret-123"])
    import urllib.request
    for path in ("/metrics", "/status", "/version", "/history?channel=science:general"):
        status, headers, body = srv.http(path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (path, status)
        assert b"ops-secret-123" not in body
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (srv.http_port, path),
                                     headers={"Authorization": "Bearer ops-secret-123"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (srv.http_port, path),
                                     headers={"Authorization": "Bearer ops-secret-12"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("a wrong ops token was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 401
    assert srv.http("/health")[0] == 200


def test_the_ops_port_can_listen_on_another_address(make_server):
    srv = make_server(args=["--http-host", "127.0.0.2"])
    import urllib.request
    with urllib.request.urlopen("http://127.0.0.2:%d/health" % srv.http_port, timeout=5) as r:
        assert r.status == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.http_port), timeout=2).close()
    alive(Bus(srv.port))


# ---- paths found in review ---------------------------------------------------------


def test_telemetry_and_agent_activity_respect_protected_rooms(make_server):
    srv = jwt_server(make_server, "--protected-rooms", "integriguard=admin,secret=admin")
    admin = Bus(srv.port, headers=bearer(token("root", roles=["admin"])), channel="integriguard:telemetry-stream")
    mallory = Bus(srv.port, headers=bearer(token("mallory", roles=["user"], rooms=["science"])))
    # Client telemetry is published to the telemetry channel's room: not
    # open to mallory, so refused, not stored, not delivered.
    mallory.send({"type": "telemetry", "id": "arq_inj", "eventType": "x", "payload": {"injected": True},
                  "ack": True})
    err = mallory.recv()
    assert error_code(err) == "forbidden" and err["correlation_id"] == "arq_inj", err
    admin.expect_nothing(0.3)
    hist = admin.command("history", {"room": "integriguard", "channel": "telemetry-stream"})
    assert not [m for m in hist["payload"]["messages"] if m["id"] == "arq_inj"]
    # An agent's messages to a protected room do not name it on the
    # dashboard channel, which more clients may read.
    srv2 = jwt_server(make_server, "--protected-rooms", "secret=admin", "--dashboard-channel", "dash:board")
    watcher = Bus(srv2.port, headers=bearer(token("gus")), channel="dash:board")
    agent = Bus(srv2.port, headers=bearer(token("bond", roles=["admin"], client_type="ai-agent")))
    for room in ("secret", "open"):
        agent.send({"type": "event", "room": room, "channel": "plans", "payload": {}})
        env, _ = watcher.recv_until(lambda e: e["type"] == "telemetry" and e["payload"].get("activity") == "message_sent")
        if room == "secret":
            assert "room" not in env["payload"] and "channel" not in env["payload"], env
        else:
            assert (env["payload"]["room"], env["payload"]["channel"]) == ("open", "plans"), env


def test_refresh_needs_a_token_that_has_not_expired_and_is_counted(make_server):
    srv = jwt_server(make_server)  # leeway 2 s
    a = Bus(srv.port, headers=bearer(token("kim", roles=["user"])))
    reply = a.command("authenticate", token=token("kim", exp_in=-1))  # within the leeway, but past exp
    assert error_code(reply) == "unauthorized" and "expired" in reply["payload"]["message"], reply
    assert a.command("authenticate", token=token("kim", roles=["user"]))["type"] == "system"
    reply = a.command("authenticate", token=token("kim") + "\u0000x")
    assert error_code(reply) == "unauthorized" and "NUL" in reply["payload"]["message"], reply
    m = srv.metrics()
    assert m['arqonbus_auth_total{result="ok"}'] == 2 and m['arqonbus_auth_total{result="refused"}'] == 2


def test_status_is_for_admins_and_listings_cost_rate(make_server):
    # 100 channels, a bucket of 10 messages refilled at 10 a second: one
    # listing of ~100 channels costs 1 + 10 messages, so the second listing
    # in a row is refused (unless a whole second passed between the two).
    many = ",".join("many:c%d" % k for k in range(100))
    srv = jwt_server(make_server, "--rate-limit-messages", "10", "--rate-limit-close-after", "1000",
                     "--bootstrap-channels", many)
    admin = Bus(srv.port, headers=bearer(token("root", roles=["admin"])))
    user = Bus(srv.port, headers=bearer(token("ursula", roles=["user"])))
    assert error_code(user.command("status")) == "forbidden"
    assert admin.command("status")["type"] == "system"
    first = user.command("list_channels")
    assert first["type"] == "system" and first["payload"]["count"] >= 100, first
    second = user.command("list_channels")
    assert error_code(second) == "rate_limited" and second["payload"]["retry_after_ms"] > 0, second
    # The bucket refills: after a second the client may list again.
    time.sleep(1.2)
    assert user.command("list_channels")["type"] == "system"
    assert srv.metrics()['arqonbus_limit_denials_total{limit="rate"}'] == 1
    alive(admin)


def test_secrets_are_not_repeated_in_config_errors():
    import subprocess
    from conftest import BIN
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    for flag in ("--jwt-secret", "--ops-token"):
        p = subprocess.run([BIN, flag, "TopSecretValue-0123456789abcdefXYZ\t"], capture_output=True, text=True,
                           timeout=20 * SLOW, env=env)
        assert p.returncode == 2 and "TopSecret" not in p.stderr and "secret not shown" in p.stderr, p.stderr


def test_guests_join_only_channels_that_exist(make_server):
    srv = jwt_server(make_server)
    guest = Bus(srv.port, headers=bearer(token("gus")))
    user = Bus(srv.port, headers=bearer(token("ursula", roles=["user"])))
    r = guest.command("join_channel", {"room": "new", "channel": "one"})
    assert error_code(r) == "forbidden" and "exist" in r["payload"]["message"], r
    assert error_code(user.command("channel_info", {"room": "new", "channel": "one"})) == "not_found"
    assert user.command("join_channel", {"room": "new", "channel": "one"})["type"] == "system"
    assert guest.command("join_channel", {"room": "new", "channel": "one"})["type"] == "system"
    g2 = Bus(srv.port, headers=bearer(token("gil")), channel="other:two")
    assert g2.welcome["payload"]["subscriptions"] == []
    assert error_code(g2.recv()) == "forbidden"
    assert error_code(user.command("channel_info", {"room": "other", "channel": "two"})) == "not_found"
