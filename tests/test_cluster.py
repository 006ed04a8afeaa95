"""A push cluster with the real servers, as examples/cluster/ deploys it: two push nodes
(`python -m sockserv push`: one select process; select with 2 workers), both with
proxy_protocol, behind a real HAProxy (send-proxy-v2, health checks), and a real
redis-server as their bus.

The HAProxy of the `cluster` fixture has, beside its balanced frontend (round robin
over both nodes), one frontend per node (``proxy.server_ports``), so that a test
knows which node each client lands on; every client goes through HAProxy (a node
refuses anyone else). The last tests run the example's own files: the TOML files
through sockserv's config loader, haproxy.cfg through HAProxy's check mode, and the
whole example as shipped (its ports moved to free ones)."""

from __future__ import annotations

import re
import subprocess
import urllib.request

import pytest

from sockserv.connection import format_address

from .conftest import HAPROXY, ROOT, free_port, listening, run_cli, stop_process, wait_for
from .test_access import client_from
from .test_bus import (
    Node,
    check_every_message_once_in_order,
    messages,
    notify_path,  # noqa: F401  (a fixture)
    wait_status,
)
from .test_proxy import read_line
from .test_push import Client

EXAMPLE = ROOT / "examples" / "cluster"
PROXIED = ("--proxy-protocol", "--proxy-allow", "127.0.0.1/32", "--access-log")


class Cluster:
    """Redis, node A (one select process), node B (select, 2 workers) and HAProxy."""

    def __init__(self, redis, nodes, proxy):
        self.redis, self.nodes, self.proxy = redis, nodes, proxy

    def client(self, node=None):
        """A push client through HAProxy: to node ``node`` (0: A, 1: B), or balanced."""
        return Client(self.proxy.port if node is None else self.proxy.server_ports[node])

    def subscriber(self, node=None, channel="news"):
        client = self.client(node)
        assert client.command(b"SUB " + channel.encode()) == b"+OK"
        return client

    def publish(self, node, *payloads, channel="news"):
        with self.client(node) as client:
            for payload in payloads:
                assert client.command(f"PUB {channel} {payload}".encode()) == b"+OK"


@pytest.fixture
def cluster(cli, redis_server, haproxy, notify_path):  # noqa: F811
    """The cluster, up: both nodes on the bus, both UP in HAProxy. Node B reports to
    ``notify_path`` (its supervisor's STATUS= lines)."""
    redis = redis_server()
    nodes = [Node(cli, redis.url(), *PROXIED),
             Node(cli, redis.url(), *PROXIED, "--workers", "2", env=notify_path.env)]
    proxy = haproxy([node.port for node in nodes], frontend_per_server=True)
    wait_for(lambda: proxy.server_status() == {"s0": "UP", "s1": "UP"}, what="both nodes UP")
    return Cluster(redis, nodes, proxy)


def test_subscribers_on_both_nodes_get_every_message_from_both_once_in_order(cluster):
    subscribers = [cluster.subscriber(node) for node in (0, 1, 0, 1, None, None)]
    per_publisher = 25
    publishers = {f"{node}.{i}": cluster.client(node) for node in (0, 1) for i in range(2)}
    check_every_message_once_in_order(publishers, subscribers, per_publisher)
    for client in [*subscribers, *publishers.values()]:
        client.close()
    for node in cluster.nodes:  # the bus stayed up all along
        bus = node.bus_lines()
        assert [line for line in bus if "lost" in line or "cannot" in line] == [], bus


def test_the_node_sees_the_client_address_not_haproxys(cluster):
    for source, port in [("127.0.0.5", cluster.proxy.server_ports[0]),
                         ("127.0.0.6", cluster.proxy.server_ports[1]),
                         ("127.0.0.7", cluster.proxy.port)]:
        with client_from(source, port) as sock:
            sock.sendall(b"PING who\n")
            assert read_line(sock) == "+PONG who"
            client = format_address(sock.getsockname())  # 127.0.0.x:<port>
        # The access log line, written when the connection ends, names the client on
        # the node it reached; HAProxy's connections come from 127.0.0.1.
        pattern = re.escape(client) + r" in=9 out=10 "
        if port == cluster.proxy.port:  # balanced: either node
            wait_for(lambda pattern=pattern: any(re.search(pattern, line)
                                                 for node in cluster.nodes
                                                 for line in drain(node)),
                     what=f"{client} in an access log")
        else:
            cluster.nodes[cluster.proxy.server_ports.index(port)].server.wait_line(pattern)
    for node in cluster.nodes:
        assert node.server.proc.poll() is None
        assert not [line for line in node.stop() if "refused" in line]


def drain(node):
    """The stderr lines a node has written so far (kept in ``seen`` for wait_line)."""
    server = node.server
    while not server.lines.empty():
        line = server.lines.get_nowait()
        if line is None:  # the end: leave it for whoever waits next
            server.lines.put(None)
            break
        server.seen.append(line)
    return server.seen


def count_lines(node, pattern):
    return sum(1 for line in drain(node) if re.search(pattern, line))


def test_redis_stopped_and_started_loses_no_local_delivery_and_crosses_again(cluster,
                                                                            notify_path):  # noqa: F811
    a, b = cluster.nodes
    sub_a, sub_b = cluster.subscriber(0), cluster.subscriber(1)
    # Node B's STATUS= (its supervisor's: the bus lives there, not in the workers)
    assert wait_status(notify_path, "bus up").endswith(": 2 workers, bus up")
    cluster.publish(0, "before")
    assert messages(sub_a, 1) == messages(sub_b, 1) == ["before"]
    cluster.redis.stop()
    for node in (a, b):
        node.server.wait_line(r"bus: lost redis://127\.0\.0\.1:\d+/0 ")
    assert wait_status(notify_path, "bus down").endswith(", bus down")
    cluster.publish(0, "a1", "a2", "a3")
    cluster.publish(1, "b1", "b2")
    assert messages(sub_a, 3) == ["a1", "a2", "a3"]  # each node's own subscribers: all
    assert messages(sub_b, 2) == ["b1", "b2"]
    cluster.redis.start()  # on the same port
    a.server.wait_line(r"bus: connected again .*; 3 message\(s\) published meanwhile")
    b.server.wait_line(r"bus: connected again .*; 2 message\(s\) published meanwhile")
    assert wait_status(notify_path, "bus up").endswith(", bus up (2 lost)")
    # What could not cross stays on its node (at most once): the next message from the
    # other node is the new one.
    cluster.publish(0, "after a")
    assert messages(sub_a, 1) == messages(sub_b, 1) == ["after a"]
    cluster.publish(1, "after b")
    assert messages(sub_b, 1) == messages(sub_a, 1) == ["after b"]
    sub_a.close()
    sub_b.close()


def test_a_node_stopped_leaves_the_other_serving_through_haproxy(cluster):
    a, b = cluster.nodes
    sub_a, sub_b = cluster.subscriber(0), cluster.subscriber(1)
    a.stop()  # SIGTERM: exits 0, closing its clients
    assert sub_a.read_line() is None
    wait_for(lambda: cluster.proxy.server_status() == {"s0": "DOWN", "s1": "UP"},
             what="HAProxy to mark node A DOWN")
    # New clients of the balanced frontend all reach node B, the one left.
    newcomers = [cluster.subscriber() for _ in range(4)]
    cluster.publish(None, "still here")
    for subscriber in [sub_b, *newcomers]:
        assert messages(subscriber, 1) == ["still here"]
    assert cluster.proxy.server_status() == {"s0": "DOWN", "s1": "UP"}
    for client in [sub_b, *newcomers]:
        client.close()
    # Node B served them all: its access log has the publisher ("PUB news still here",
    # "+OK") and five subscribers ("SUB news"; "+OK", the message): the four and sub_b.
    wait_for(lambda: count_lines(b, r"127\.0\.0\.1:\d+ in=9 out=24 ") == 5
             and count_lines(b, r"127\.0\.0\.1:\d+ in=20 out=4 ") == 1,
             what="node B's access log lines")
    sub_a.close()


# -- the example's own files -------------------------------------------------------------


@pytest.mark.parametrize("name", ["node1.toml", "node2.toml"])
def test_the_example_node_configs_load(name):
    result = run_cli("push", "--config", str(EXAMPLE / name), "--print-config")
    assert result.returncode == 0, result.stderr
    config = result.stdout
    assert "proxy_protocol = true" in config
    assert 'bus = "redis://127.0.0.1:6379/0"' in config
    assert ("workers = 2" in config) == (name == "node2.toml")


needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (Debian "
                                   "package haproxy; .ci/run installs it)")


@needs_haproxy
def test_the_example_haproxy_config_passes_haproxy_check_mode():
    result = subprocess.run([HAPROXY, "-c", "-f", str(EXAMPLE / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def example_haproxy_config(ports):
    """examples/cluster/haproxy.cfg with its ports ({7070: free, ...}) replaced."""
    text = (EXAMPLE / "haproxy.cfg").read_text()
    for old, new in ports.items():
        text, count = re.subn(rf"\b127\.0\.0\.1:{old}\b", f"127.0.0.1:{new}", text)
        assert count, f"port {old} is no longer in haproxy.cfg"
    return text


def check_states(stats_port):
    """``{"node1": "L7OK", ...}`` from the example's stats page (CSV)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/;csv", timeout=5) as page:
        lines = page.read().decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {row["svname"]: (row["status"], row["check_status"], int(row["scur"]))
            for row in rows if row["pxname"] == "push_nodes" and row["svname"].startswith("node")}


@needs_haproxy
def test_the_example_runs_as_shipped(cli, redis_server, tmp_path):
    """The example's files, only their ports moved: its health check (PING through the
    PROXY header) finds both nodes, and two subscribers land one on each node
    (leastconn) and both get a message published through HAProxy."""
    redis = redis_server()
    node_ports = [free_port(), free_port()]
    nodes = [Node(cli, redis.url(), "--config", str(EXAMPLE / f"node{i + 1}.toml"),
                  "--port", str(port)) for i, port in enumerate(node_ports)]
    front, stats = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(example_haproxy_config({7070: front, 7071: node_ports[0],
                                              7072: node_ports[1], 8404: stats}))
    with open(tmp_path / "haproxy.log", "wb") as log:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    try:
        wait_for(lambda: proc.poll() is None and listening(stats) and listening(front),
                 what="haproxy to listen")
        # The example checks every 2 s: a PING after the v2 LOCAL header.
        wait_for(lambda: {state[:2] for state in check_states(stats).values()}
                 == {("UP", "L7OK")}, timeout=15, what="both nodes' health checks to pass")
        subscribers = [Client(front) for _ in range(2)]
        for subscriber in subscribers:
            assert subscriber.command(b"SUB news") == b"+OK"
        # One each; the stats page may count the second session a moment late.
        wait_for(lambda: [state[2] for state in check_states(stats).values()] == [1, 1],
                 timeout=5, what="one subscriber on each node (leastconn)")
        with Client(front) as publisher:
            assert publisher.command(b"PUB news through the example") == b"+OK"
        for subscriber in subscribers:
            assert messages(subscriber, 1) == ["through the example"]
            subscriber.close()
    finally:
        stop_process(proc)
    for node in nodes:
        assert [line for line in node.stop() if "refused" in line or "lost" in line] == []
