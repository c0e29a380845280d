"""Several nodes on one Redis: one bus.

Two or three real arqonbus processes on free ports share a real
redis-server (or two, as shards) through the same --redis-url, each with
its own --node-id. What a user of such a bus relies on (docs/scaling.md,
docs/protocol.md "Several nodes"):

- channel messages published on any node reach every subscriber on every
  node exactly once, in the order of their positions (the channel's stream
  ids), the same order for everybody, and nothing of another channel; the
  sender does not get its own message back, its node's other clients do;
- a node that dies (SIGKILL) does not stop the others;
- with several Redis servers every channel lives on exactly one of them
  (FNV-1a of "room:channel" picks it) and delivery works on all of them;
- history asked on one node holds what was published on another, with the
  same positions;
- private messages, room-wide events, notifications, presence
  (list_channels, channel_info, status) and client id take-overs (4001)
  work across nodes, and a dead node's clients disappear after node_ttl.

Every envelope received is checked against the published schema
(envelopes.check, through Bus or clusterutil.Reader). Waits have deadlines;
nothing asserts on timing.
"""
import json
import time
import signal
import tempfile
import threading

import pytest
import redis as redis_py

from clusterutil import (Publisher, Reader, check_channel_delivery, check_only_expected, connect, fnv1a32,
                         http_json, is_event, pos_key, run_event, split, stream_key, sync_channels,
                         wait_health, wait_until)
from conftest import SLOW
from envelopes import close_of, error_code
from rawws import still_open
from redisproc import RedisServer

ALPHA, BETA = "cl:alpha", "cl:beta"

# Settings for the bulk runs: a subscriber read by a Python selector may
# fall far behind the publishers, which the server must not take for a slow
# consumer; and streams keep every message of the run (trimming is not what
# these tests are about: test_redis_history.py covers it).
BULK = ["--max-outbound-queue", "64MiB", "--history-size", "20000"]


@pytest.fixture
def redises():
    """Factory: redises() -> a started RedisServer; all stopped at the end
    (after the arqonbus processes: this fixture is set up before them)."""
    started = []

    def factory():
        r = RedisServer(tempfile.mkdtemp(prefix="arqonbus-redis-")).start()
        started.append(r)
        return r

    yield factory
    for r in started:
        r.stop()


@pytest.fixture
def cluster(redises, make_server):
    """Factory: cluster(names, shards=1, args=[...]) -> (redis list, {name:
    node}). Starts one arqonbus per name (its --node-id) on the same
    --redis-url, and waits until each is connected to Redis."""

    def factory(names, shards=1, args=()):
        rs = [redises() for _ in range(shards)]
        url = ",".join(r.url for r in rs)
        nodes = {}
        for name in names:
            nodes[name] = make_server(args=["--redis-url", url, "--redis-timeout", "2s", "--node-id", name]
                                      + list(args))
        for node in nodes.values():
            wait_health(node)
        return rs, nodes

    return factory


def stream(r, channel):
    """XRANGE of 'channel' on the RedisServer 'r': [(stream id, fields)]."""
    return r.entries(channel)


def close_all(buses):
    for bus in buses:
        try:
            bus.close()
        except OSError:
            pass


# ---- channel messages between nodes ----------------------------------------------


def run_bulk(cluster, names, per_node, both):
    """Each node has a publisher (a member of ALPHA), a subscriber of ALPHA,
    one of BETA and, with 'both', one of both. Every publisher sends
    'per_node' events, alternately to ALPHA and BETA, all at once."""
    (r,), nodes = cluster(names, args=BULK)
    reader = Reader()
    buses = []
    try:
        members = {ALPHA: [], BETA: []}
        subs = {}  # reader name -> its channels
        for i, name in enumerate(names):
            node = nodes[name]
            for who, chans in [("pub", [ALPHA]), ("sa", [ALPHA]), ("sb", [BETA])] + (
                    [("sab", [ALPHA, BETA])] if both else []):
                cid = "%s%d" % (who, i)
                bus = connect(node, cid, chans)
                buses.append(bus)
                reader.add(cid, bus)
                subs[cid] = chans
                for c in chans:
                    members[c].append(cid)
        syncer = connect(nodes[names[0]], "syncer")
        buses.append(syncer)
        sync_channels(reader, syncer, members)

        sent, ids = {}, {ALPHA: [], BETA: []}
        pubs = []
        for i, name in enumerate(names):
            items = []
            for j in range(per_node):
                channel = ALPHA if j % 2 == 0 else BETA
                mid = "arq_n%d_%d" % (i, j)
                items.append(run_event(channel, mid, i, j))
                sent[mid] = {"from": "pub%d" % i, "payload": {"pub": i, "j": j}}
                ids[channel].append(mid)
            pubs.append(Publisher(reader.buses["pub%d" % i], items))

        def expected(cid, channel):
            """The run ids 'cid' must get on 'channel': all but its own."""
            return [m for m in ids[channel] if sent[m]["from"] != cid]

        want = {cid: sum(len(expected(cid, c)) for c in chans) for cid, chans in subs.items()}
        for p in pubs:
            p.start()
        for p in pubs:
            p.finish()

        def done():
            behind = {cid: (reader.run_count[cid], n) for cid, n in want.items() if reader.run_count[cid] < n}
            return not behind or "received/expected per client: %r" % behind
        reader.pump(done, 60, "every subscriber gets every message")
        reader.settle()  # a duplicate or a stray message would arrive now

        streams = {c: stream(r, c) for c in (ALPHA, BETA)}
        for channel in (ALPHA, BETA):
            stored = [f["id"] for _, f in streams[channel] if f["id"] in sent]
            assert sorted(stored) == sorted(ids[channel]), "%s: the stream does not hold the run" % channel
        for cid, chans in subs.items():
            check_only_expected(reader, cid, chans)
            for channel in chans:
                check_channel_delivery(reader, cid, channel, expected(cid, channel), streams[channel], sent)
        # Echo is off: a publisher gets the others' messages but not its
        # own; its node's subscribers get them.
        for i in range(len(names)):
            got = {e["from"] for e in reader.events("pub%d" % i)}
            assert "pub%d" % i not in got and len(got) == len(names) - 1, got
            assert "pub%d" % i in {e["from"] for e in reader.events("sa%d" % i)}
        # The same sequence for every subscriber of a channel, on every node.
        for channel, who in ((ALPHA, "sa"), (BETA, "sb")):
            ref = [e["id"] for e in reader.events("%s0" % who) if (e["room"], e["channel"]) == split(channel)]
            assert len(ref) == len(ids[channel])
            for cid in members[channel]:
                seq = [(e["id"], e["position"]) for e in reader.events(cid)
                       if (e["room"], e["channel"]) == split(channel)]
                assert [m for m, _ in seq] == [m for m in ref if sent[m]["from"] != cid], cid
        return reader
    finally:
        close_all(buses)


def test_two_nodes_deliver_every_message_once_in_order(cluster):
    run_bulk(cluster, ["n0", "n1"], per_node=1000, both=True)


def test_three_nodes_deliver_every_message_once_in_order(cluster):
    run_bulk(cluster, ["n0", "n1", "n2"], per_node=1000, both=False)


def test_a_killed_node_does_not_stop_the_others(cluster):
    names = ["na", "nb", "nc"]
    (r,), nodes = cluster(names, args=BULK)
    reader = Reader()
    buses = []
    try:
        members = {ALPHA: [], BETA: []}
        subs = {}
        pub_bus = {}
        for name in names:
            node = nodes[name]
            pub_bus[name] = connect(node, "pub-" + name)
            buses.append(pub_bus[name])
            for channel, who in ((ALPHA, "sa-"), (BETA, "sb-")):
                cid = who + name
                bus = connect(node, cid, [channel])
                buses.append(bus)
                reader.add(cid, bus)
                subs[cid] = channel
                members[channel].append(cid)
        syncer = connect(nodes["na"], "syncer")
        buses.append(syncer)
        sync_channels(reader, syncer, members)

        def items(name, n, start=0):
            return [run_event(ALPHA if j % 2 == 0 else BETA, "arq_%s_%d" % (name, j), name, j)
                    for j in range(start, start + n)]

        # na and nb publish 300 each, then (after the kill) 300 more; nc
        # publishes at a steady pace until it is killed.
        first = {n: Publisher(pub_bus[n], items(n, 300), pause=0.002, every=2) for n in ("na", "nb")}
        victim = Publisher(pub_bus["nc"], items("nc", 5000), pause=0.002)
        for p in list(first.values()) + [victim]:
            p.start()
        for p in first.values():
            p.finish()
        # Wait until the survivors deliver nc's messages too: nc is mid-run.
        reader.pump(lambda: sum(1 for e in reader.events("sa-na") if e["payload"]["pub"] == "nc") >= 20
                    or "nc's messages not delivered yet", 20, "nc's messages reach na")
        assert victim.is_alive(), "nc stopped publishing before it was killed"
        victim.cut = True
        for cid in ("sa-nc", "sb-nc"):
            reader.ended.add(cid)
        nodes["nc"].stop(check=False, sig=signal.SIGKILL)
        victim.finish()
        assert victim.error is not None  # its connection died with the node
        second = {n: Publisher(pub_bus[n], items(n, 300, start=300), pause=0.002, every=2) for n in ("na", "nb")}
        for p in second.values():
            p.start()
        for p in second.values():
            p.finish()

        sent = {}
        for n in ("na", "nb"):
            for env in first[n].items + second[n].items:
                sent[env["id"]] = {"from": "pub-" + n, "payload": env["payload"]}
        survivors = [cid for cid in subs if not cid.endswith("nc")]

        def done():
            behind = {}
            for cid in survivors:
                n = sum(1 for e in reader.events(cid) if e["payload"]["pub"] in ("na", "nb"))
                if n < 600:
                    behind[cid] = n
            return not behind or "messages of na and nb received (of 600): %r" % behind
        reader.pump(done, 60, "the surviving nodes deliver everything published on them")
        # The killed node's subscribers were cut off.
        reader.pump(lambda: all(c in reader.closed for c in ("sa-nc", "sb-nc")) or reader.closed, 10,
                    "the killed node's connections end")
        reader.settle()

        for channel in (ALPHA, BETA):
            entries = stream(r, channel)
            stored = {f["id"] for _, f in entries}
            mine = [m for m in sent if run_event_channel(m) == channel]
            assert set(mine) <= stored, "%s: messages published on live nodes are missing from the stream" % channel
            # Whatever nc stored before it died is delivered too: the
            # survivors' sequence is the stream's, run messages only.
            run_ids = [f["id"] for _, f in entries if "sync" not in json.loads(f["envelope"])["payload"]]
            nc_stored = [m for m in run_ids if m.startswith("arq_nc_")]
            assert nc_stored, "nothing nc published was stored"
            for cid in survivors:
                if subs[cid] != channel:
                    continue
                check_only_expected(reader, cid, [channel])
                check_channel_delivery(reader, cid, channel, run_ids, entries, sent)
        for n in ("na", "nb"):
            wait_health(nodes[n])
    finally:
        close_all(buses)


def run_event_channel(mid):
    """The channel items() above sends message 'mid' to."""
    return ALPHA if int(mid.rsplit("_", 1)[1]) % 2 == 0 else BETA


def test_channels_are_spread_over_redis_shards(cluster):
    (r1, r2), nodes = cluster(["na", "nb"], shards=2, args=BULK)
    channels = ["sh:c%02d" % k for k in range(20)]
    reader = Reader()
    buses = []
    try:
        for name in ("na", "nb"):
            bus = connect(nodes[name], "sub-" + name, channels)
            buses.append(bus)
            reader.add("sub-" + name, bus)
        pubs = {name: connect(nodes[name], "pub-" + name) for name in ("na", "nb")}
        buses += list(pubs.values())
        sync_channels(reader, pubs["na"], {c: ["sub-na", "sub-nb"] for c in channels})
        sent, ids = {}, {c: [] for c in channels}
        publishers = []
        for i, name in enumerate(("na", "nb")):
            items = []
            for j in range(100):
                channel = channels[j % 20]
                mid = "arq_%s_%d" % (name, j)
                items.append(run_event(channel, mid, name, j))
                sent[mid] = {"from": "pub-" + name, "payload": {"pub": name, "j": j}}
                ids[channel].append(mid)
            publishers.append(Publisher(pubs[name], items))
        for p in publishers:
            p.start()
        for p in publishers:
            p.finish()
        reader.pump(lambda: all(reader.run_count[c] >= 200 for c in reader.buses) or reader.run_count, 30,
                    "every message on every shard reaches both nodes")
        reader.settle()

        clients = [redis_py.Redis(host="127.0.0.1", port=r.port) for r in (r1, r2)]
        try:
            used = set()
            for channel in channels:
                held = [k for k, c in enumerate(clients) if c.exists(stream_key(channel))]
                assert len(held) == 1, "%s: stream on shards %r" % (channel, held)
                assert held[0] == fnv1a32(channel) % 2, "%s is on shard %d" % (channel, held[0])
                used.add(held[0])
                entries = stream((r1, r2)[held[0]], channel)
                for cid in reader.buses:
                    check_channel_delivery(reader, cid, channel, ids[channel], entries, sent)
            assert used == {0, 1}, "20 channels all on one shard"
            # The stream between nodes and the presence keys live on the first URL.
            assert clients[0].exists("arqon:bus") and not clients[1].exists("arqon:bus")
            assert not clients[1].keys("arqon:node*")
        finally:
            for c in clients:
                c.close()
        for cid in reader.buses:
            check_only_expected(reader, cid, channels)
    finally:
        close_all(buses)


# ---- history, private messages, presence, identity, room-wide events ---------


def test_history_on_one_node_holds_what_another_node_published(cluster):
    (r,), nodes = cluster(["na", "nb"])
    channel = "hi:story"
    room, ch = split(channel)
    reader = Reader()
    buses = []
    try:
        sub_b = connect(nodes["nb"], "sub-b", [channel])
        buses.append(sub_b)
        reader.add("sub-b", sub_b)
        pub = connect(nodes["na"], "pub-a")
        buses.append(pub)
        reader.add("pub-a", pub)
        sync_channels(reader, pub, {channel: ["sub-b"]})
        for j in range(30):
            pub.send(dict(run_event(channel, "arq_h%d" % j, "a", j), ack=True))
        acks = {}

        def done():
            acks.update({e["payload"]["id"]: e for e in reader.received["pub-a"]
                         if e["type"] == "system" and e["payload"].get("event") == "ack"})
            return (len(acks) == 30 and reader.run_count["sub-b"] == 30) or (len(acks), reader.run_count["sub-b"])
        reader.pump(done, 20, "acks on A and delivery on B")
        live = [e for e in reader.received["sub-b"] if is_event(e)]
        assert [acks["arq_h%d" % j]["payload"]["position"] for j in range(30)] == \
            [e["position"] for e in live if "j" in e["payload"]]

        asker_b = connect(nodes["nb"], "asker-b")
        asker_a = connect(nodes["na"], "asker-a")
        buses += [asker_b, asker_a]
        # Everything after the first message B's subscriber received:
        # exactly what it received, as it received it.
        reply = asker_b.command("history", {"room": room, "channel": ch}, since=live[0]["position"], limit=100)
        assert reply["type"] == "system", reply
        assert reply["payload"]["gap"] is False and reply["payload"]["more"] is False
        assert reply["payload"]["messages"] == live[1:]
        # From the start of the stream: the run is there too.
        reply = asker_b.command("history", {"room": room, "channel": ch}, since="0", limit=100)
        assert reply["payload"]["gap"] is False
        assert reply["payload"]["messages"][-30:] == live[-30:]
        # The newest ones, as on node A.
        reply_b = asker_b.command("history", {"room": room, "channel": ch}, limit=10)
        reply_a = asker_a.command("history", {"room": room, "channel": ch}, limit=10)
        assert reply_b["payload"]["messages"] == reply_a["payload"]["messages"] == live[-10:]
        assert reply_b["payload"]["more"] is True
        # Resuming on B from a position A acknowledged.
        since = acks["arq_h9"]["payload"]["position"]
        reply = asker_b.command("history", {"room": room, "channel": ch}, since=since, limit=10)
        msgs = reply["payload"]["messages"]
        assert [m["id"] for m in msgs] == ["arq_h%d" % j for j in range(10, 20)]
        assert [m["position"] for m in msgs] == [acks["arq_h%d" % j]["payload"]["position"] for j in range(10, 20)]
        assert all(m["from"] == "pub-a" for m in msgs)
        assert reply["payload"]["more"] is True and reply["payload"]["gap"] is False
        assert all(pos_key(a["position"]) < pos_key(b["position"]) for a, b in zip(msgs, msgs[1:]))
    finally:
        close_all(buses)


def bus_clients(node):
    """The bus-wide client count in the node's /status."""
    return http_json(node, "/status").get("bus", {}).get("clients")


def test_private_messages_reach_clients_on_other_nodes(cluster):
    _, nodes = cluster(["na", "nb"])
    buses = []
    try:
        x = connect(nodes["na"], "x")
        w = connect(nodes["na"], "w")
        y = connect(nodes["nb"], "y")
        buses += [x, w, y]
        # Presence is up to a second old: wait until each node knows the
        # other's clients.
        for node in nodes.values():
            wait_until(lambda: bus_clients(node) == 3, 5,
                       "node on port %d does not count the 3 clients of both nodes" % node.port)

        x.send({"type": "private", "id": "arq_pv1", "to": ["y", "w", "ghost"], "payload": {"secret": 1},
                "ack": True})
        for bus in (y, w):
            env, skipped = bus.recv_until(lambda e: e["type"] == "private")
            assert skipped == [], skipped
            assert (env["id"], env["from"], env["payload"]) == ("arq_pv1", "x", {"secret": 1}), env
            assert "ack" not in env
        ack, err = None, None
        for _ in range(2):
            env = x.recv()
            if env["type"] == "error":
                err = env
            else:
                ack = env
        assert err is not None and error_code(err) == "not_found", err
        assert err["correlation_id"] == "arq_pv1" and err["payload"]["unknown"] == ["ghost"], err
        assert ack is not None and ack["payload"] == {"event": "ack", "id": "arq_pv1"}, ack
        assert "position" not in ack["payload"] and "channel" not in ack
        y.expect_nothing(0.3)  # once each
        w.expect_nothing(0.1)

        # The other way round, to a client on node A only: no error.
        y.send({"type": "private", "id": "arq_pv2", "to": ["x"], "payload": {"back": True}})
        env, skipped = x.recv_until(lambda e: e["type"] == "private")
        assert (env["id"], env["from"], env["payload"]) == ("arq_pv2", "y", {"back": True}), env
        assert skipped == []
        y.expect_nothing(0.3)
        x.expect_nothing(0.1)
    finally:
        close_all(buses)


def channel_info(bus, channel):
    room, ch = split(channel)
    reply = bus.command("channel_info", {"room": room, "channel": ch})
    return reply


def members_seen(bus, channel):
    """(members count, sorted member ids) of 'channel' per channel_info, or
    the error code."""
    reply = channel_info(bus, channel)
    if reply["type"] == "error":
        return reply["payload"]["code"]
    p = reply["payload"]
    return p["members"], sorted(m["client_id"] for m in p["member_list"])


def test_presence_covers_every_node_and_expires_with_a_dead_node(cluster):
    _, nodes = cluster(["na", "nb"], args=["--node-ttl", "2s"])
    channel, only_b = "pr:c", "pr:d"
    buses = []
    try:
        asker_a = connect(nodes["na"], "asker-a")
        asker_b = connect(nodes["nb"], "asker-b")
        a1 = connect(nodes["na"], "a1", [channel])
        buses += [asker_a, asker_b, a1]
        wait_until(lambda: members_seen(asker_b, channel) == (1, ["a1"]), 5, "node B lists a1 in pr:c")

        b1 = connect(nodes["nb"], "b1", [channel], client_type="ai-agent")
        b2 = connect(nodes["nb"], "b2", [only_b])
        buses += [b1, b2]
        # a1, on the other node, is told that b1 joined.
        env, skipped = a1.recv_until(lambda e: e["type"] == "system" and e["payload"].get("event") == "client_joined")
        assert (env["room"], env["channel"]) == split(channel), env
        assert env["payload"]["client_id"] == "b1" and env["payload"]["client_type"] == "ai-agent", env
        assert env["payload"]["members"] == 2, env

        for asker in (asker_a, asker_b):
            wait_until(lambda: members_seen(asker, channel) == (2, ["a1", "b1"]), 5,
                       "channel_info on %s lists the members of both nodes" % asker.id)
        info = channel_info(asker_a, channel)["payload"]
        assert {m["client_id"]: m["client_type"] for m in info["member_list"]} == {"a1": "human", "b1": "ai-agent"}

        def listed(bus):
            reply = bus.command("list_channels", {"room": "pr"})
            assert reply["type"] == "system", reply
            return {(c["room"], c["channel"]): c["members"] for c in reply["payload"]["channels"]}
        wait_until(lambda: listed(asker_a) == {("pr", "c"): 2, ("pr", "d"): 1}, 5,
                   "list_channels on A shows pr:c (2 members) and B's pr:d (1)")
        assert members_seen(asker_a, only_b) == (1, ["b2"])

        reply = asker_a.command("status")
        assert reply["type"] == "system", reply
        s = reply["payload"]
        assert {n["node"]: (n["self"], n["clients"]) for n in s["nodes"]} == {"na": (True, 2), "nb": (False, 3)}, \
            s["nodes"]
        assert (s["bus"]["nodes"], s["bus"]["clients"]) == (2, 5), s["bus"]

        # Node B dies: its clients disappear from A's view within node_ttl
        # (2 s here), without any client_left.
        nodes["nb"].stop(check=False, sig=signal.SIGKILL)
        wait_until(lambda: members_seen(asker_a, channel) == (1, ["a1"]), 8,
                   "node B's member leaves pr:c as seen from node A")
        wait_until(lambda: ("pr", "d") not in listed(asker_a), 5, "node B's channel leaves list_channels on A")
        s = wait_until(lambda: (lambda p: len(p["nodes"]) == 1 and p)(asker_a.command("status")["payload"]), 5,
                       "node B leaves status on A")
        assert [(n["node"], n["self"]) for n in s["nodes"]] == [("na", True)]
        assert (s["bus"]["nodes"], s["bus"]["clients"]) == (1, 2), s["bus"]
        a1.send({"type": "command", "command": "ping", "id": "arq_alive"})
        env, skipped = a1.recv_until(lambda e: e.get("correlation_id") == "arq_alive")
        assert not [e for e in skipped if e["type"] == "system" and e["payload"].get("event") == "client_left"], skipped
        wait_health(nodes["na"])
    finally:
        close_all(buses)


def test_the_same_client_id_on_another_node_replaces_the_first(cluster):
    _, nodes = cluster(["na", "nb"])
    buses = []
    try:
        first = connect(nodes["na"], "dup", ["id:room"])
        buses.append(first)
        second = connect(nodes["nb"], "dup", ["id:room"])
        buses.append(second)
        code, reason = close_of(first.ws, 10 * SLOW)
        assert (code, reason) == (4001, "replaced by a new connection with the same client_id"), (code, reason)
        # The newest connection stays; at most it hears that the old one
        # left the channel.
        reply = second.command("ping")
        assert reply["type"] == "system" and reply["command"] == "pong", reply
        for env in second.skipped:
            assert env["type"] == "system" and env["payload"]["event"] in ("client_left", "client_joined"), env
        assert still_open(second.ws.sock)
        reply = second.command("status")
        assert reply["payload"]["you"]["client_id"] == "dup"
    finally:
        close_all(buses)


def test_room_wide_events_reach_the_rooms_members_on_other_nodes(cluster):
    _, nodes = cluster(["na", "nb"])
    buses = []
    try:
        local = connect(nodes["na"], "local", ["rw:one"])
        m1 = connect(nodes["nb"], "m1", ["rw:one"])
        m2 = connect(nodes["nb"], "m2", ["rw:two"])
        m3 = connect(nodes["nb"], "m3", ["rw:one", "rw:two"])
        outsider = connect(nodes["nb"], "outsider", ["other:one"])
        sender = connect(nodes["na"], "sender")
        buses += [local, m1, m2, m3, outsider, sender]
        sender.send({"type": "event", "id": "arq_rw1", "room": "rw", "payload": {"all": True}, "ack": True})
        ack = sender.recv()
        assert ack["type"] == "system" and ack["payload"] == {"event": "ack", "id": "arq_rw1"}, ack
        assert ack["room"] == "rw" and "channel" not in ack, ack
        for bus in (local, m1, m2, m3):
            env, skipped = bus.recv_until(is_event)
            assert (env["id"], env["from"], env["room"], env["payload"]) == ("arq_rw1", "sender", "rw", {"all": True})
            assert "channel" not in env and "position" not in env, env
            assert all(e["type"] == "system" for e in skipped), skipped
        for bus in (m3, m1, m2, local):  # once, even when in two of the room's channels
            rest = []
            try:
                while True:
                    rest.append(bus.recv(0.3))
            except OSError:
                pass
            assert not [e for e in rest if is_event(e)], rest
        outsider.expect_nothing(0.1)
    finally:
        close_all(buses)


# ---- which streams a node reads ----------------------------------------------------


def streams_read(r, seconds):
    """Watches Redis with MONITOR for 'seconds' (times SLOW) and returns,
    per client address, the set of stream keys its XREAD commands named."""
    client = redis_py.Redis(host="127.0.0.1", port=r.port)
    seen = {}
    try:
        with client.monitor() as m:
            deadline = time.monotonic() + seconds * SLOW
            # Presence refreshes and reads (BLOCK of at most a second) keep
            # commands coming, so next_command() never waits long.
            while time.monotonic() < deadline:
                cmd = m.next_command()
                words = cmd["command"].split(" ")
                if words[0].upper() != "XREAD":
                    continue
                upper = [w.upper() for w in words]
                rest = words[upper.index("STREAMS") + 1:]
                keys = rest[:len(rest) // 2]
                seen.setdefault("%s:%s" % (cmd["client_address"], cmd["client_port"]), set()).update(keys)
    finally:
        client.close()
    return seen


def test_a_node_reads_only_the_streams_its_clients_are_members_of(cluster):
    (r,), nodes = cluster(["na", "nb"])
    one, two, three = (stream_key(c) for c in ("ri:one", "ri:two", "ri:three"))
    buses = []
    try:
        a = connect(nodes["na"], "a", ["ri:one"])
        b = connect(nodes["nb"], "b", ["ri:two"])
        pub = connect(nodes["na"], "pub")
        buses += [a, b, pub]
        # ri:three gets messages but has no members anywhere.
        for k in range(3):
            pub.send({"type": "event", "id": "arq_ri%d" % k, "room": "ri", "channel": "three", "payload": {}})
        reader = Reader()
        reader.add("a", a)
        reader.add("b", b)
        sync_channels(reader, pub, {"ri:one": ["a"], "ri:two": ["b"]})
        assert r.entries("ri:three"), "messages to a channel without members are still stored"

        seen = streams_read(r, 2.5)
        # One reading connection per node, each on the bus stream and its
        # own members' channel only.
        assert sorted(sorted(keys) for keys in seen.values()) == [
            sorted(["arqon:bus", one]), sorted(["arqon:bus", two])], seen

        # b leaves: node B stops reading ri:two (it still reads arqon:bus).
        reply = b.command("leave_channel", {"room": "ri", "channel": "two"})
        assert reply["type"] == "system", reply

        def b_stopped():
            s = streams_read(r, 1.5)
            return sorted(sorted(keys) for keys in s.values()) == [["arqon:bus"], sorted(["arqon:bus", one])] or s
        wait_until(lambda: b_stopped() is True, 10, "node B stops reading ri:two after its member left")
    finally:
        close_all(buses)
