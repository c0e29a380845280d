"""Connection identity from the upgrade request and the welcome
(docs/protocol.md, Connection identity and the welcome).

Query parameters client_id, client_type, screen_name, avatar, personality,
channel (room:channel, or room= and channel=) and echo; an invalid value is a
400 at the handshake whose one-line body names the parameter; the server's
client ids; the welcome; the same client id twice (the older connection is
closed with 4001 and its channels are told); what the server keeps per client,
seen in status.you, channel_info and notifications.

Every envelope received goes through envelopes.check() (Bus.recv does it).
"""
import re
import subprocess

import pytest

from conftest import BIN
from envelopes import Bus
from rawws import RawWS, upgrade_request

TS_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$")


def drain(bus):
    """The envelopes that reach 'bus' before the answer to a ping it sends now."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply
    return list(bus.skipped)


def handshake(port, path):
    """Sends an upgrade request for 'path'; returns (status, headers, body)."""
    with RawWS(port, upgrade=False) as ws:
        req, _ = upgrade_request(path=path)
        ws.send(req)
        return ws.read_http_response()


def bus_at(port, path):
    """A Bus on an upgrade request for 'path' exactly as written."""
    b = Bus.__new__(Bus)
    b.ws = RawWS(port, path=path)
    b.timeout, b._n = 5.0, 0
    b.welcome = b.recv()
    assert b.welcome["type"] == "system" and b.welcome["payload"]["event"] == "welcome", b.welcome
    b.id = b.welcome["payload"]["client_id"]
    return b


def welcome_of(bus):
    w = bus.welcome
    assert w["type"] == "system" and w["payload"]["event"] == "welcome", w
    return w["payload"]


def test_parameters_describe_the_client(server):
    obs = Bus(server.port, client_id="obs", channel="science:explore")
    path = ("/some/path?client_id=ada.l%40lab_1-x&client_type=ai-agent&screen_name=Ada+Lovelace%20%C3%A9"
            "&avatar=https%3A%2F%2Fexample.org%2Fa.png%3Fs%3D64%26t%3D1&personality=curious%3B+kind+%F0%9F%A7%AE"
            "&channel=science%3Aexplore&echo=true&token=ignored&x")
    ada = bus_at(server.port, path)

    w = welcome_of(ada)
    assert w["client_id"] == "ada.l@lab_1-x"
    assert w["client_type"] == "ai-agent"
    assert w["echo"] is True
    assert w["subscriptions"] == ["science:explore"]

    joined = obs.recv()
    assert joined["type"] == "system" and (joined["room"], joined["channel"]) == ("science", "explore"), joined
    assert joined["payload"] == {"event": "client_joined", "client_id": "ada.l@lab_1-x", "client_type": "ai-agent",
                                 "screen_name": "Ada Lovelace \u00e9", "members": 2}

    you = ada.command("status")["payload"]["you"]
    assert you["client_id"] == "ada.l@lab_1-x"
    assert you["client_type"] == "ai-agent"
    assert you["screen_name"] == "Ada Lovelace \u00e9"
    assert you["avatar"] == "https://example.org/a.png?s=64&t=1"
    assert you["personality"] == "curious; kind \U0001F9EE"
    assert you["subscriptions"] == ["science:explore"]

    info = obs.command("channel_info", {"room": "science", "channel": "explore"})["payload"]
    members = {m["client_id"]: m for m in info["member_list"]}
    assert set(members) == {"obs", "ada.l@lab_1-x"}
    assert members["ada.l@lab_1-x"]["client_type"] == "ai-agent"
    assert members["ada.l@lab_1-x"]["screen_name"] == "Ada Lovelace \u00e9"
    assert members["obs"]["client_type"] == "human" and "screen_name" not in members["obs"]

    # echo=true: its own event comes back, once.
    ada.send({"type": "event", "id": "arq_echo1", "room": "science", "channel": "explore"})
    mine = [e for e in drain(ada) if e["type"] == "event"]
    assert [e["id"] for e in mine] == ["arq_echo1"]
    assert [e["id"] for e in drain(obs) if e["type"] == "event"] == ["arq_echo1"]


def test_defaults_and_assigned_client_ids(server):
    buses = [Bus(server.port) for _ in range(5)]
    ids = [b.id for b in buses]
    for b in buses:
        assert re.match(r"^client-[0-9a-f]{12}$", b.id), b.id
        w = welcome_of(b)
        assert w["client_type"] == "human" and w["echo"] is False and w["subscriptions"] == []
    assert len(set(ids)) == 5
    you = buses[0].command("status")["payload"]["you"]
    assert you["client_id"] == ids[0] and you["client_type"] == "human" and you["subscriptions"] == []
    for k in ("screen_name", "avatar", "personality"):
        assert k not in you, you
    # echo defaults to false: no copy of its own event.
    buses[0].command("join_channel", {"room": "lab", "channel": "x"})
    buses[0].send({"type": "event", "room": "lab", "channel": "x"})
    assert drain(buses[0]) == []


@pytest.mark.parametrize("params", [
    "channel=science:explore",
    "channel=science%3Aexplore",
    "room=science&channel=explore",
    "channel=explore&room=science",
    "room=science&channel=science:explore",
])
def test_initial_channel_forms(server, params):
    obs = Bus(server.port, channel="science:explore")
    b = bus_at(server.port, "/?client_id=newbie&" + params)
    assert welcome_of(b)["subscriptions"] == ["science:explore"]
    note = obs.recv()
    assert (note["room"], note["channel"]) == ("science", "explore"), note
    assert note["payload"]["event"] == "client_joined" and note["payload"]["client_id"] == "newbie"
    assert note["payload"]["members"] == 2
    b.close()


def test_the_welcome(make_server):
    s = make_server(args=["--heartbeat-interval", "7s", "--max-message-size", "256KiB", "--max-envelope-size",
                          "64KiB", "--history-size", "20", "--history-max-limit", "10", "--max-malformed", "4"])
    out = subprocess.run([BIN, "--version"], capture_output=True, text=True, timeout=10).stdout
    version = out.split()[1]
    b = Bus(s.port, client_id="ada", client_type="dashboard", channel="lab:bench")
    w = b.welcome
    assert w["version"] == "1.0" and w["type"] == "system"
    for k in ("room", "channel", "from", "command", "correlation_id"):
        assert k not in w, w
    assert TS_RE.match(w["timestamp"])
    assert w["payload"] == {
        "event": "welcome", "client_id": "ada", "client_type": "dashboard", "server_version": version,
        "protocol_version": "1.0", "heartbeat_interval_ms": 7000, "echo": False,
        "limits": {"max_message_size": 262144, "max_envelope_size": 65536, "history_size": 20,
                   "history_max_limit": 10, "max_recipients": 100, "max_malformed": 4,
                   "rate_limit_messages": 2000, "rate_limit_bytes": 16777216, "max_subscriptions": 256},
        "subscriptions": ["lab:bench"], "roles": ["admin", "user"]}

    d = Bus(make_server().port)
    assert welcome_of(d)["heartbeat_interval_ms"] == 25000
    assert welcome_of(d)["limits"] == {"max_message_size": 1048576, "max_envelope_size": 524288,
                                       "history_size": 500, "history_max_limit": 500, "max_recipients": 100,
                                       "max_malformed": 10, "rate_limit_messages": 2000,
                                       "rate_limit_bytes": 16777216, "max_subscriptions": 256}


LONG = "x" * 65
INVALID = [
    ("client_id", "client_id="),
    ("client_id", "client_id=bad+id"),
    ("client_id", "client_id=-lead"),
    ("client_id", "client_id=" + "a" * 65),
    ("client_id", "client_id=ad%21a"),
    ("client_id", "client_id=ad%zza"),
    ("client_id", "client_id=ad%00a"),
    ("client_type", "client_type=robot"),
    ("client_type", "client_type=Human"),
    ("client_type", "client_type="),
    ("screen_name", "screen_name="),
    ("screen_name", "screen_name=" + "n" * 129),
    ("screen_name", "screen_name=" + "%C3%A9" * 64 + "n"),
    ("screen_name", "screen_name=a%01b"),
    ("screen_name", "screen_name=a%0Ab"),
    ("screen_name", "screen_name=a%7Fb"),
    ("screen_name", "screen_name=a%C3%28b"),
    ("screen_name", "screen_name=a%C2%85b"),  # U+0085 (NEL) is a control character (Unicode Cc)
    ("avatar", "avatar="),
    ("avatar", "avatar=" + "a" * 513),
    ("avatar", "avatar=a%0Db"),
    ("personality", "personality="),
    ("personality", "personality=" + "p" * 513),
    ("personality", "personality=a%09b"),
    ("channel", "channel=science"),
    ("channel", "channel=a:b:c"),
    ("channel", "channel=sci+ence:explore"),
    ("channel", "channel=:explore"),
    ("channel", "channel=science:"),
    ("channel", "channel=%s:explore" % LONG),
    ("channel", "channel=science:%s" % LONG),
    ("channel", "channel="),
    ("channel", "room=chat&channel=science:explore"),
    ("channel", "room=science&channel=bad%21"),
    ("room", "room=science"),
    ("room", "room=bad+room&channel=x"),
    ("echo", "echo=maybe"),
    ("echo", "echo="),
    ("echo", "echo=TRUE"),
    ("echo", "echo=maybe"),
]


@pytest.mark.parametrize("name,params", INVALID, ids=["%s:%s" % (n, p[:40]) for n, p in INVALID])
def test_invalid_parameter_is_refused_with_400_naming_it(server, name, params):
    status, headers, body = handshake(server.port, "/?" + params)
    text = body.decode("utf-8", "replace")
    assert status == 400, (status, text)
    assert re.search(r"\b%s\b" % name, text), "body does not name %s: %r" % (name, text)
    assert text.strip() and "\n" not in text.strip(), "not one line: %r" % text


def test_valid_boundaries_are_accepted(server):
    for params in [
        {"client_id": "A" * 64},
        {"client_id": "0"},
        {"client_id": "z.y-x_w@v"},
        {"screen_name": "\u00e9" * 64},            # 128 bytes
        {"screen_name": "s"},
        {"avatar": "a" * 512},
        {"personality": "\u4e16" * 170 + "pp"},   # 512 bytes
        {"channel": "%s:%s" % ("r" * 64, "c" * 64)},
        {"echo": "false"},
    ]:
        b = Bus(server.port, **params)
        w = welcome_of(b)
        if "client_id" in params:
            assert w["client_id"] == params["client_id"]
        if "channel" in params:
            assert w["subscriptions"] == [params["channel"]]
        you = b.command("status")["payload"]["you"]
        for k in ("screen_name", "avatar", "personality"):
            if k in params:
                assert you[k] == params[k]
        b.close()


def test_same_client_id_twice_the_newest_wins(server):
    obs = Bus(server.port, client_id="obs", channel="science:explore")
    obs.join("chat:public")
    old = Bus(server.port, client_id="ada", client_type="ai-agent", channel="science:explore")
    old.join("chat:public")
    notes = drain(obs)
    assert [(n["channel"], n["payload"]["event"]) for n in notes] == [("explore", "client_joined"),
                                                                       ("public", "client_joined")]

    new = Bus(server.port, client_id="ada")
    assert welcome_of(new)["client_id"] == "ada" and welcome_of(new)["subscriptions"] == []
    code, reason = old.expect_close()
    assert (code, reason) == (4001, "replaced by a new connection with the same client_id")

    # The old connection left its channels, and each was told.
    left = obs.recv_until(lambda e: e["type"] == "system" and e["payload"].get("event") == "client_left")[0]
    left2 = obs.recv_until(lambda e: e["type"] == "system" and e["payload"].get("event") == "client_left")[0]
    got = {(e["room"], e["channel"]) for e in (left, left2)}
    assert got == {("science", "explore"), ("chat", "public")}
    for e in (left, left2):
        assert e["payload"]["client_id"] == "ada" and e["payload"]["reason"] == "disconnected"
        assert e["payload"]["client_type"] == "ai-agent" and e["payload"]["members"] == 1
    info = obs.command("channel_info", {"room": "chat", "channel": "public"})["payload"]
    assert [m["client_id"] for m in info["member_list"]] == ["obs"]

    # The new connection works, and is the one "ada" reaches.
    assert new.command("ping")["command"] == "pong"
    you = new.command("status")["payload"]["you"]
    assert you["client_id"] == "ada" and you["client_type"] == "human" and you["subscriptions"] == []
    obs.send({"type": "private", "id": "arq_to_ada", "to": ["ada"], "payload": {"hi": 1}})
    got = new.recv()
    assert got["type"] == "private" and got["id"] == "arq_to_ada" and got["from"] == "obs"
    assert drain(obs) == []  # "ada" is connected: no not_found
    st = obs.command("status")["payload"]
    assert st["clients"]["total"] == 2


def test_same_client_id_reconnecting_into_the_same_channel(server):
    """A client that reconnects with its initial channel: the members hear of
    the old connection leaving, then of the new one joining, and end with it
    listed once."""
    obs = Bus(server.port, client_id="obs", channel="science:explore")
    old = Bus(server.port, client_id="ada", channel="science:explore")
    assert obs.recv()["payload"]["event"] == "client_joined"
    new = Bus(server.port, client_id="ada", channel="science:explore")
    assert old.expect_close()[0] == 4001
    assert welcome_of(new)["subscriptions"] == ["science:explore"]
    notes = [(n["payload"]["event"], n["payload"]["client_id"], n["payload"]["members"]) for n in drain(obs)]
    assert notes == [("client_left", "ada", 1), ("client_joined", "ada", 2)], notes
    info = obs.command("channel_info", {"room": "science", "channel": "explore"})["payload"]
    assert sorted(m["client_id"] for m in info["member_list"]) == ["ada", "obs"] and info["members"] == 2
    # The new connection is a member and gets the channel's events.
    obs.send({"type": "event", "id": "arq_after", "room": "science", "channel": "explore"})
    drain(obs)
    assert [e["id"] for e in drain(new) if e["type"] == "event"] == ["arq_after"]


def test_status_you_tracks_activity_and_counts(server):
    g = Bus(server.port, client_id="grace", client_type="service", screen_name="Grace H", avatar="g.png",
            personality="precise", channel="science:design")
    peer = Bus(server.port, client_id="peer", channel="science:design")
    s1 = g.command("status")["payload"]["you"]
    assert TS_RE.match(s1["connected_at"]) and TS_RE.match(s1["last_activity"])
    assert s1["last_activity"] >= s1["connected_at"]
    assert s1["screen_name"] == "Grace H" and s1["avatar"] == "g.png" and s1["personality"] == "precise"
    assert s1["client_type"] == "service" and s1["subscriptions"] == ["science:design"]

    g.send({"type": "event", "room": "science", "channel": "design"})
    g.send({"type": "event", "room": "science", "channel": "design"})
    peer.send({"type": "event", "id": "arq_from_peer", "room": "science", "channel": "design"})
    g.recv_until(lambda e: e.get("id") == "arq_from_peer")
    s2 = g.command("status")["payload"]["you"]
    # Between the two status commands grace sent 3 messages (2 events and the
    # second status) and received 2 (the first status reply and peer's event).
    assert s2["messages_sent"] - s1["messages_sent"] == 3, (s1, s2)
    assert s2["messages_received"] - s1["messages_received"] == 2, (s1, s2)
    assert s2["last_activity"] >= s1["last_activity"] and s2["connected_at"] == s1["connected_at"]

    g.join("chat:public")
    s3 = g.command("status")["payload"]
    assert sorted(s3["you"]["subscriptions"]) == ["chat:public", "science:design"]
    assert s3["clients"]["by_type"]["service"] == 1 and s3["clients"]["by_type"]["human"] == 1
