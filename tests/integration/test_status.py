"""GET /status, GET /history and the status command.

What an operator observes: /status agrees with what was done to the bus
(the server's figures; every client with its id, type, screen name,
connected_at, last_activity and subscriptions, in connection order and paged
with offset and limit; rooms and their channels with participant counts);
the status command returns the same data; /history returns what the history
command returns for the same arguments; bad parameters get 400 with a JSON
error.

Every envelope received goes through envelopes.check() (Bus.recv does it,
and the messages inside history answers are checked here too).
"""
import json
import re
import time
import urllib.parse

from busprobe import counted_bus
from conftest import SLOW
import envelopes
from envelopes import Bus, check, error_code
from rawws import OP_TEXT, RawWS, close_payload

TIMEOUT = 5.0 * SLOW
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
BOOTSTRAP = ["science:general", "science:explore", "science:hypothesize", "science:design", "science:execute",
             "science:interpret", "science:share", "integriguard:telemetry-stream", "integriguard:dashboard-events"]

def close_of(ws):
    return envelopes.close_of(ws, TIMEOUT)


def get_json(server, path, **params):
    """(status, parsed JSON body) of GET 'path' with query 'params'."""
    if params:
        path += "?" + urllib.parse.urlencode(params)
    status, headers, body = server.http(path)
    assert headers["Content-Type"] == "application/json", headers
    return status, json.loads(body)


def status(server, **params):
    code, body = get_json(server, "/status", **params)
    assert code == 200, body
    return body


def wall_ms(ts):
    """Milliseconds of an ISO timestamp, comparable with time.time() * 1000."""
    import datetime
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000


def channels_of(st):
    """{"room:channel": (members, bootstrap)} from a status body."""
    out = {}
    for room in st["room_details"]:
        for ch in room["channels"]:
            out["%s:%s" % (room["room"], ch["channel"])] = (ch["members"], ch["bootstrap"])
    return out


def items_by_id(st):
    return {c["client_id"]: c for c in st["clients"]["items"]}


def close_all(*conns):
    for c in conns:
        c.close()


# ---- /status reflects the bus -------------------------------------------------

def test_status_agrees_with_what_was_done_to_the_bus(server):
    before = time.time() * 1000 - 1
    ada = Bus(server.port, timeout=TIMEOUT, client_id="ada", client_type="ai-agent", screen_name="Ada",
              channel="lab:one")
    bob = Bus(server.port, timeout=TIMEOUT, client_id="bob")
    carl = Bus(server.port, timeout=TIMEOUT, client_id="carl", client_type="service", screen_name="Carl",
               channel="lab:one")
    carl.join("lab:two")
    carl.join("other:x")
    dee = Bus(server.port, timeout=TIMEOUT, client_id="dee", client_type="dashboard")
    assert ada.recv()["payload"]["event"] == "client_joined"
    after = time.time() * 1000 + 1

    st = status(server)
    m = server.metrics()  # nothing happened in between
    assert st["server"]["name"] == "arqonbus" and st["server"]["protocol_version"] == "1.0"
    version = json.loads(server.http("/version")[2])["version"]
    assert st["server"]["version"] == version
    assert ISO.match(st["server"]["started_at"]) and wall_ms(st["server"]["started_at"]) <= before + 1
    assert isinstance(st["server"]["uptime_seconds"], int) and st["server"]["uptime_seconds"] >= 0
    assert st["server"]["connections"] == 4 and st["server"]["telemetry_clients"] == 0
    clients = st["clients"]
    assert clients["total"] == 4 and clients["offset"] == 0 and clients["limit"] == 100
    assert clients["by_type"] == {"human": 1, "ai-agent": 1, "dashboard": 1, "service": 1}
    assert [c["client_id"] for c in clients["items"]] == ["ada", "bob", "carl", "dee"]  # connection order
    items = items_by_id(st)
    want = {"ada": ("ai-agent", "Ada", ["lab:one"]), "bob": ("human", None, []),
            "carl": ("service", "Carl", ["lab:one", "lab:two", "other:x"]), "dee": ("dashboard", None, [])}
    for cid, (ctype, name, subs) in want.items():
        c = items[cid]
        assert c["client_type"] == ctype and c.get("screen_name") == name, c
        assert sorted(c["subscriptions"]) == subs, c
        assert ISO.match(c["connected_at"]) and ISO.match(c["last_activity"]), c
        assert before <= wall_ms(c["connected_at"]) <= after, (c, before, after)
        assert c["last_activity"] >= c["connected_at"], c
    assert (items["carl"]["messages_sent"], items["carl"]["messages_received"]) == (2, 3)  # 2 joins; welcome, 2 replies
    assert (items["ada"]["messages_sent"], items["ada"]["messages_received"]) == (0, 2)  # welcome, carl joined
    chans = channels_of(st)
    assert chans["lab:one"] == (2, False) and chans["lab:two"] == (1, False) and chans["other:x"] == (1, False)
    for name in BOOTSTRAP:
        assert chans[name] == (0, True), name
    assert set(chans) == set(BOOTSTRAP) | {"lab:one", "lab:two", "other:x"}
    assert st["rooms"] == 4 == len(st["room_details"]) and st["channels"] == len(chans)
    # The same channels and counts as list_channels.
    listed = bob.command("list_channels")["payload"]["channels"]
    assert {"%s:%s" % (c["room"], c["channel"]): (c["members"], c["bootstrap"]) for c in listed} == chans
    # ada's and carl's agent_activity (connected; connected and two command_run)
    # is the only history so far.
    assert st["history"] == {"backend": "memory", "messages": 4, "capacity_per_channel": 500}
    dash = {c["channel"]: c for r in st["room_details"] if r["room"] == "integriguard" for c in r["channels"]}
    assert dash["dashboard-events"]["history"] == 4 and dash["telemetry-stream"]["history"] == 0
    assert st["messages"]["received"] == sum(v for k, v in m.items() if k.startswith(
        "arqonbus_messages_received_total{") and "invalid" not in k)
    assert st["messages"]["delivered"] == sum(v for k, v in m.items() if k.startswith(
        "arqonbus_messages_delivered_total{"))

    # bob speaks; carl leaves a channel; ada goes.
    time.sleep(0.01)
    bob.send({"type": "event", "room": "lab", "channel": "one", "payload": {"hi": 1}})
    assert ada.recv()["type"] == "event" and carl.recv()["type"] == "event"
    assert carl.command("leave_channel", {"room": "lab", "channel": "two"})["payload"]["left"] is True
    st2 = status(server)
    items2 = items_by_id(st2)
    assert items2["bob"]["last_activity"] > items["bob"]["last_activity"]
    assert items2["bob"]["messages_sent"] == 2  # list_channels, the event
    assert sorted(items2["carl"]["subscriptions"]) == ["lab:one", "other:x"]
    lab = {c["channel"]: c for r in st2["room_details"] if r["room"] == "lab" for c in r["channels"]}
    assert (lab["one"]["members"], lab["one"]["messages"], lab["one"]["history"]) == (2, 1, 1)
    assert lab["two"]["members"] == 0  # kept for channel_ttl
    assert st2["history"]["messages"] == 6  # bob's event, carl's command_run
    ada.ws.send_frame(0x8, close_payload(1000))
    assert close_of(ada.ws) == (1000, "")
    ada.close()
    assert carl.recv()["payload"]["event"] == "client_left"
    st3 = status(server)
    assert [c["client_id"] for c in st3["clients"]["items"]] == ["bob", "carl", "dee"]
    assert st3["clients"]["total"] == 3 and st3["clients"]["by_type"]["ai-agent"] == 0
    assert channels_of(st3)["lab:one"] == (1, False)
    assert st3["server"]["connections"] == 3
    close_all(bob, carl, dee)


def test_status_pages_through_25_clients(server):
    ids = ["p%02d" % i for i in range(25)]
    buses = [Bus(server.port, timeout=TIMEOUT, client_id=i) for i in ids]
    pages = []
    for offset in (0, 10, 20):
        st = status(server, offset=offset, limit=10)
        assert st["clients"]["total"] == 25 and st["clients"]["offset"] == offset and st["clients"]["limit"] == 10
        pages.append([c["client_id"] for c in st["clients"]["items"]])
    assert pages == [ids[0:10], ids[10:20], ids[20:25]]
    for offset in (25, 1000):
        st = status(server, offset=offset, limit=10)
        assert st["clients"]["items"] == [] and st["clients"]["total"] == 25
    st = status(server)
    assert [c["client_id"] for c in st["clients"]["items"]] == ids and st["clients"]["limit"] == 100
    assert status(server, limit=5000)["clients"]["limit"] == 1000
    assert [c["client_id"] for c in status(server, offset=24, limit=1)["clients"]["items"]] == ["p24"]
    # The status command pages the same way.
    reply = buses[0].command("status", offset=10, limit=10)
    assert [c["client_id"] for c in reply["payload"]["clients"]["items"]] == ids[10:20]
    # A client that leaves is gone from its page; the rest move up.
    buses[5].close()
    deadline = time.monotonic() + TIMEOUT
    while status(server)["clients"]["total"] != 24:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first = [c["client_id"] for c in status(server, limit=10)["clients"]["items"]]
    assert first == ids[0:5] + ids[6:11]
    close_all(*buses)


def test_status_bad_parameters_get_400(server):
    for query in ("offset=-1", "offset=abc", "offset=1.5", "offset=", "offset", "limit=0", "limit=-3", "limit=",
                  "limit=10abc", "limit=%2D1", "offset=0&limit=0"):
        code, headers, body = server.http("/status?" + query)
        assert code == 400, (query, code, body)
        assert headers["Content-Type"] == "application/json"
        err = json.loads(body)
        assert err["error"] == "invalid_argument" and err["message"], (query, err)
    # Unknown parameters are ignored.
    assert server.http("/status?verbose=1")[0] == 200
    with Bus(server.port, timeout=TIMEOUT) as bus:
        for payload in ({"offset": -1}, {"limit": 0}, {"limit": "10"}, {"offset": 1.5}, {"limit": None}):
            reply = bus.command("status", **payload)
            assert error_code(reply) == "invalid_argument", (payload, reply)
            assert reply["command"] == "status"


def test_status_command_returns_what_get_status_returns(make_server):
    server = make_server(args=["--telemetry-stats-interval", "0"])
    mon = RawWS(server.telemetry_port, timeout=TIMEOUT, path="/?events=stats")  # counted, sent nothing
    mon.sock.settimeout(TIMEOUT)
    assert check(mon.recv_message()[1])["payload"]["event"] == "welcome"
    a, a_sock, _ = counted_bus(server.port, timeout=TIMEOUT, client_id="asker", screen_name="Asker", channel="lab:s")
    b = Bus(server.port, timeout=TIMEOUT, client_id="other", client_type="ai-agent", channel="lab:s")
    assert a.recv()["payload"]["event"] == "client_joined"
    b.send({"type": "event", "payload": {"x": 1}})
    assert a.recv()["type"] == "event"
    received = a_sock.received
    reply = a.command("status")
    reply_bytes = a_sock.received - received
    http = status(server)
    cmd = reply["payload"]
    you = cmd.pop("you")
    assert you == items_by_id(cmd)["asker"], (you, cmd["clients"])
    assert you["screen_name"] == "Asker" and you["subscriptions"] == ["lab:s"]
    # What differs is the reply itself: delivered after the command's snapshot.
    assert http["messages"]["delivered"] == cmd["messages"]["delivered"] + 1
    assert http["server"]["bytes_out"] == cmd["server"]["bytes_out"] + reply_bytes
    asker = items_by_id(http)["asker"]
    assert asker["messages_received"] == you["messages_received"] + 1
    assert 0 <= http["server"]["uptime_seconds"] - cmd["server"]["uptime_seconds"] <= 1
    for k in ("bytes_out", "uptime_seconds"):
        http["server"][k] = cmd["server"][k]
    http["messages"]["delivered"] = cmd["messages"]["delivered"]
    asker["messages_received"] = you["messages_received"]
    assert http == cmd, (http, cmd)
    assert cmd["server"]["connections"] == 3 and cmd["server"]["telemetry_clients"] == 1
    # Paged, the same clients.
    page = a.command("status", offset=1, limit=1)["payload"]["clients"]
    assert page == status(server, offset=1, limit=1)["clients"]
    assert [c["client_id"] for c in page["items"]] == ["other"]
    close_all(a, b, mon)


# ---- /history and the history command ------------------------------------------

def history_reply(bus, room, channel, **payload):
    r = bus.command("history", {"room": room, "channel": channel}, **payload)
    assert r["type"] == "system" and r["command"] == "history", r
    for m in r["payload"]["messages"]:
        check(m)
    return r["payload"]


def test_history_returns_what_the_history_command_returns(server):
    pub = Bus(server.port, timeout=TIMEOUT, channel="lab:h", echo=True)
    ids = []
    for i in range(7):
        mid = "arq_h%d" % i
        pub.send({"type": "event", "id": mid, "payload": {"i": i}})
        assert pub.recv()["id"] == mid
        ids.append(mid)
    pub.send({"type": "event", "room": "lab", "channel": "other", "payload": {}})
    pub.send({"type": "telemetry", "eventType": "t", "payload": {"n": 1}})
    assert pub.command("ping")["command"] == "pong"
    cases = [{}, {"limit": 3}, {"since": ids[1]}, {"since": ids[1], "limit": 2}, {"since": "arq_unknown"},
             {"limit": 100000}, {"since": ids[6]}]
    for payload in cases:
        want = history_reply(pub, "lab", "h", **payload)
        code, got = get_json(server, "/history", room="lab", channel="h", **payload)
        assert code == 200 and got == want, (payload, got, want)
        code, got = get_json(server, "/history", channel="lab:h", **payload)
        assert code == 200 and got == want, (payload, got, want)
    assert [m["id"] for m in history_reply(pub, "lab", "h")["messages"]] == ids
    assert [m["id"] for m in get_json(server, "/history", room="lab", channel="h", limit=3)[1]["messages"]] == ids[4:]
    for room, channel in (("lab", "other"), ("integriguard", "telemetry-stream"), ("lab", "none")):
        want = history_reply(pub, room, channel)
        code, got = get_json(server, "/history", room=room, channel=channel)
        assert code == 200 and got == want, (room, channel, got, want)
    pub.close()


def test_history_bad_parameters_get_400(server):
    cases = ["", "room=lab", "channel=h", "room=lab&channel=bad%20name", "room=-lab&channel=h",
             "room=lab&channel=h&limit=0", "room=lab&channel=h&limit=-1", "room=lab&channel=h&limit=abc",
             "room=lab&channel=h&limit=", "room=lab&channel=h&since=nope", "room=lab&channel=h&since=arq_",
             "room=lab&channel=h&since=arq_a%20b", "room=other&channel=lab:h", "channel=lab:", "channel=:h",
             "room=lab&channel=" + "c" * 65]
    for query in cases:
        code, headers, body = server.http("/history?" + query)
        assert code == 400, (query, code, body)
        assert headers["Content-Type"] == "application/json"
        err = json.loads(body)
        assert err["error"] == "invalid_argument" and err["message"], (query, err)
