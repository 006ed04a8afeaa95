"""`python -m sockserv bench` against real servers, good and deliberately broken, and the
comparison script's pure parts (table, chart) on canned numbers.

The runs are tiny (a fraction of a second): these tests check that the counts add up and
that errors are caught, never how fast anything is."""

from __future__ import annotations

import array
import importlib.util
import itertools
import json
import os
import pty
import re
import select
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sockserv
from sockserv.bench import Histogram, Options
from sockserv.bench.common import WORKLOADS
from sockserv.bench.report import format_summary
from sockserv.bench.run import build_result
from sockserv.bench.soak import soak_accounting

from .conftest import ENGINE_NAMES, ROOT, run_cli

SHORT = ("--duration", "0.4", "--warmup", "0.1")


def bench(*args, timeout=60):
    """Run `sockserv bench ARGS --json`; returns (exit status, result dict or None, stderr)."""
    done = run_cli("bench", *args, "--json", timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, (json.loads(lines[-1]) if lines else None), done.stderr


def bench_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSERV_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def assert_clean(result):
    assert result["ok"], result
    assert result["error_count"] == 0, result["errors"]
    assert all(v == 0 for v in result["errors"].values()), result["errors"]
    assert result["messages"] > 0


@pytest.fixture
def echo_server(cli):
    """A `sockserv echo` subprocess (default engine): (port, pid)."""
    def start(*args):
        server = cli("echo", "--port", "0", *args)
        return server.wait_serving(), server.proc.pid
    return start


# -- the workloads against a sockserv echo server ----------------------------------------


@pytest.mark.parametrize("workload, extra", [
    ("pingpong", ("-c", "10")),
    ("pipeline", ("-c", "5", "-k", "8")),
    ("pingpong", ("-c", "10", "--procs", "2")),
    ("pipeline", ("-c", "4", "-k", "4", "--size", "3000")),
])
def test_echo_workloads_count_every_message(echo_server, workload, extra):
    port, pid = echo_server()
    status, r, err = bench(workload, "--port", str(port), *SHORT, *extra, "--server-pid", str(pid))
    assert status == 0, err
    assert_clean(r)
    c = r["counts"]
    assert c["sent"] == c["received"] == c["verified"] > 0
    assert c["abandoned"] == 0
    assert c["connected"] == r["connections"]
    assert r["messages"] <= c["verified"]  # the window is a part of the whole run
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    server = r["server"]
    assert server["pid"] == pid
    assert server["cpu_s"] >= 0 and server["peak_rss_bytes"] >= server["rss_bytes"] > 0
    assert server["cpu_per_message_us"] is not None and server["processes"] >= 1


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pingpong_on_every_engine(echo_server, engine, proto):
    port, pid = echo_server("--engine", engine, "--proto", proto)
    status, r, err = bench("pingpong", "--proto", proto, "--port", str(port), "-c", "3", *SHORT)
    assert status == 0, err
    assert_clean(r)
    c = r["counts"]
    assert c["verified"] == c["received"] == c["sent"] - c.get("lost", 0) > 0


def test_connrate_counts_every_cycle(echo_server):
    port, pid = echo_server()
    status, r, err = bench("connrate", "--port", str(port), "-c", "4", *SHORT,
                           "--server-pid", str(pid))
    assert status == 0, err
    assert_clean(r)
    c = r["counts"]
    assert c["connects"] == c["sent"] == c["received"] == c["verified"] > 0


def test_hold_checks_every_connection_and_reports_rss_per_connection(echo_server):
    port, pid = echo_server()
    status, r, err = bench("hold", "--port", str(port), "-c", "50", "--duration", "0.3",
                           "--server-pid", str(pid))
    assert status == 0, err
    assert_clean(r)
    c = r["counts"]
    assert c["held"] == c["answered"] == c["sent"] == 50
    assert "rss_per_connection" in r["server"]
    assert r["per_second"] is None


def test_fork_engine_children_count_in_the_server_figures(echo_server):
    port, pid = echo_server("--engine", "fork")
    status, r, err = bench("hold", "--port", str(port), "-c", "4", "--duration", "0.3",
                           "--server-pid", str(pid))
    assert status == 0, err
    assert r["counts"]["answered"] == 4
    assert r["server"]["processes"] >= 5  # the parent and one child per held connection


@pytest.mark.parametrize("workload, extra", [
    ("udp", ("-c", "2", "-k", "5")),
    ("pingpong", ("--proto", "udp", "-c", "4")),
])
def test_udp_workloads_account_for_every_datagram(echo_server, workload, extra):
    port, pid = echo_server("--proto", "udp")
    status, r, err = bench(workload, "--port", str(port), *SHORT, *extra,
                           "--server-pid", str(pid))
    assert status == 0, err
    assert_clean(r)
    c = r["counts"]
    assert c["received"] == c["verified"] > 0
    assert c["sent"] == c["received"] + c["lost"]  # loopback rarely loses one; none is unseen


def test_source_addrs_spread_connections_over_loopback_addresses(serve):
    peers = set()

    class Recorder(sockserv.EchoHandler):
        def connection_made(self):
            peers.add(self.conn.peer[0])

    server = serve("thread", Recorder)
    status, r, err = bench("hold", "--port", str(server.server_address[1]), "-c", "6",
                           "--source-addrs", "3", "--duration", "0.2")
    assert status == 0, err
    assert r["counts"]["answered"] == 6
    assert peers == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}


# -- broken servers: every fault is counted and fails the run ------------------------------


class FlipOneByte(socketserver.BaseRequestHandler):
    """An echo that gets the last byte of every chunk wrong."""

    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data[:-1] + bytes([data[-1] ^ 0x20]))


class Silent(socketserver.BaseRequestHandler):
    """Reads everything, answers nothing."""

    def handle(self):
        while self.request.recv(65536):
            pass


class HangUp(socketserver.BaseRequestHandler):
    """Echoes one chunk, then closes."""

    def handle(self):
        self.request.sendall(self.request.recv(65536))


class UdpFlip(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data[:-1] + b"?", self.client_address)


def test_a_wrong_echo_is_caught_and_fails_the_run(serve):
    server = serve(sockserv.ThreadingTCPServer, FlipOneByte)
    status, r, _ = bench("pingpong", "--port", str(server.server_address[1]), "-c", "3", *SHORT)
    assert status == 1
    assert r["errors"]["mismatches"] == 3  # each connection is dropped at its first bad echo
    assert r["counts"]["verified"] == 0
    assert not r["ok"] and "differ" in r["first_error"]


def test_a_wrong_echo_fails_the_human_summary_too(serve):
    server = serve(sockserv.ThreadingTCPServer, FlipOneByte)
    done = run_cli("bench", "pipeline", "--port", str(server.server_address[1]), "-c", "2", *SHORT)
    assert done.returncode == 1
    assert "mismatches 2" in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("sockserv: bench failed:")


def test_a_wrong_udp_echo_is_caught(serve):
    server = serve(sockserv.ThreadingUDPServer, UdpFlip, proto="udp")
    status, r, _ = bench("udp", "--port", str(server.server_address[1]), "-c", "1", "-k", "2",
                         *SHORT)
    assert status == 1
    assert r["errors"]["mismatches"] > 0 and r["counts"]["verified"] == 0


def test_silence_counts_as_timeouts(serve):
    server = serve(sockserv.ThreadingTCPServer, Silent)
    status, r, _ = bench("pingpong", "--port", str(server.server_address[1]), "-c", "3",
                         "--duration", "0.6", "--warmup", "0", "--timeout", "0.2")
    assert status == 1
    assert r["errors"]["timeouts"] == 3
    assert r["counts"]["abandoned"] == 3 and r["counts"]["verified"] == 0


def test_a_hung_server_cannot_keep_the_run_going(serve):
    # The timeout is far beyond the run: the run still ends, at duration + grace, and
    # what never came back is counted.
    server = serve(sockserv.ThreadingTCPServer, Silent)
    status, r, _ = bench("pipeline", "--port", str(server.server_address[1]), "-c", "2", "-k", "3",
                         "--duration", "0.3", "--warmup", "0", "--timeout", "600",
                         "--grace", "0.2", timeout=20)
    assert status == 1
    assert r["errors"]["timeouts"] == 2
    assert r["counts"]["sent"] == r["counts"]["abandoned"] == 6


def test_closed_connections_count_as_resets(serve):
    server = serve(sockserv.ThreadingTCPServer, HangUp)
    status, r, _ = bench("pingpong", "--port", str(server.server_address[1]), "-c", "3", *SHORT)
    assert status == 1
    assert r["errors"]["resets"] == 3
    assert r["counts"]["verified"] == 3  # the one echo each connection got was right


def test_connrate_catches_a_wrong_echo(serve):
    server = serve(sockserv.ThreadingTCPServer, FlipOneByte)
    status, r, _ = bench("connrate", "--port", str(server.server_address[1]), "-c", "2", *SHORT)
    assert status == 1
    assert r["errors"]["mismatches"] > 0 and r["counts"]["verified"] == 0


def test_connrate_counts_a_silent_server_as_timeouts(serve):
    server = serve(sockserv.ThreadingTCPServer, Silent)
    status, r, _ = bench("connrate", "--port", str(server.server_address[1]), "-c", "2",
                         "--duration", "0.6", "--warmup", "0", "--timeout", "0.2")
    assert status == 1
    assert r["errors"]["timeouts"] >= 2 and r["counts"]["verified"] == 0


def test_udp_loss_is_counted_but_is_not_an_error(serve):
    counter = itertools.count(1)
    lock = threading.Lock()

    class DropEveryFifth(socketserver.BaseRequestHandler):
        def handle(self):
            with lock:
                n = next(counter)
            if n % 5:
                data, sock = self.request
                sock.sendto(data, self.client_address)

    server = serve(sockserv.ThreadingUDPServer, DropEveryFifth, proto="udp")
    status, r, err = bench("udp", "--port", str(server.server_address[1]), "-c", "1", "-k", "4",
                           "--timeout", "0.05", *SHORT)
    assert status == 0, err
    c = r["counts"]
    assert c["lost"] > 0
    assert c["sent"] == c["received"] + c["lost"]
    assert r["error_count"] == 0


def test_nothing_listening_exits_1_with_one_line(cli):
    from .conftest import free_port

    done = run_cli("bench", "pingpong", "--port", str(free_port()), *SHORT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        next(line for line in done.stderr.splitlines() if "no connection" in line)]
    assert "Connection refused" in done.stderr


@pytest.mark.parametrize("args, fragment", [
    (("fanout", "--size", "10"), "at least 24"),
    (("hold", "--proto", "udp"), "TCP workload"),
    (("udp", "--proto", "tcp"), "UDP only"),
    (("pingpong", "--pipeline", "4"), "pipeline workload"),
    (("udp", "--size", "100000"), "UDP datagrams"),
    (("hold", "--source-addrs", "2", "--host", "::1"), "IPv4 loopback"),
    (("pingpong", "--server-pid", "999999999"), "no such process"),
    (("pingpong", "--connections", "0"), "out of range 1 or more"),
    (("pingpong", "--duration", "soon"), "not a number of seconds"),
    (("fanout", "--channel", "bad channel"), "--channel"),
    (("pingpong", "-c", "100000"), "--procs"),
    (("soak", "--proto", "udp"), "TCP workload"),
    (("soak", "--size", "20"), "at least 28"),
    (("soak", "--pipeline", "2"), "does not apply to soak"),
    (("soak", "--fault-rate", "-1"), "--fault-rate"),
    (("soak", "--channel", "c" * 110), "soak adds up to 24 more"),
    (("pingpong", "--publish-port", "7071"), "apply to fanout only"),
])
def test_bad_options_exit_2_with_one_line(args, fragment):
    done = run_cli("bench", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sockserv: error:"), lines
    assert fragment in lines[0]


# -- fanout against a minimal push server written here -----------------------------------


def push_handler(faults=False):
    """A minimal push server (SUB -> +OK, PUB -> +OK and MSG to every subscriber), one shared
    channel table per call. With ``faults``: the 3rd message skips the first subscriber and
    the 5th goes out twice."""
    channels: dict[bytes, list] = {}
    lock = threading.Lock()
    published = itertools.count(1)

    class MiniPush(sockserv.LineHandler):
        def line_received(self, line):
            command, _, rest = line.partition(b" ")
            if command == b"SUB":
                with lock:
                    channels.setdefault(rest, []).append(self.conn)
                self.conn.write(b"+OK\n")
            elif command == b"PUB":
                channel, _, payload = rest.partition(b" ")
                message = b"MSG " + channel + b" " + payload + b"\n"
                with lock:
                    n = next(published)
                    subscribers = list(channels.get(channel, ()))
                for i, conn in enumerate(subscribers):
                    if faults and n == 3 and i == 0:
                        continue
                    conn.write(message * (2 if faults and n == 5 else 1))
                self.conn.write(b"+OK\n")
            else:
                self.conn.write(b"-ERR unknown command\n")

        def connection_lost(self, exc):
            with lock:
                for conns in channels.values():
                    if self.conn in conns:
                        conns.remove(self.conn)

    return MiniPush


@pytest.mark.parametrize("extra", [(), ("--procs", "2")])
def test_fanout_every_subscriber_gets_every_message_once_in_order(serve, extra):
    server = serve("thread", push_handler())
    status, r, err = bench("fanout", "--port", str(server.server_address[1]), "-c", "6",
                           "--rate", "50", *SHORT, *extra)
    assert status == 0, err
    assert_clean(r)
    c = r["counts"]
    assert c["subscribers"] == 6 and c["published"] > 0
    assert c["acked"] == c["published"] + 1  # and the end marker
    assert c["delivered"] == c["expected"] == 6 * c["published"]
    assert c["lost"] == c["duplicates"] == c["reordered"] == 0
    assert r["latency_us"]["p50"] > 0


def test_fanout_over_udp(serve):
    server = serve("thread", push_handler(), proto="udp")
    status, r, err = bench("fanout", "--proto", "udp", "--port", str(server.server_address[1]),
                           "-c", "3", "--rate", "50", *SHORT)
    assert status == 0, err
    c = r["counts"]
    assert c["subscribers"] == 3 and c["delivered"] + c["lost"] == c["expected"] > 0
    assert c["duplicates"] == 0 and r["errors"]["mismatches"] == 0


def test_fanout_across_nodes_publishes_on_one_and_subscribes_on_the_other(cli, redis_server):
    from .test_bus import Node

    redis = redis_server()
    subscribed, publishing = Node(cli, redis.url()), Node(cli, redis.url(), "--workers", "2")
    status, r, err = bench("fanout", "--port", str(subscribed.port), "--publish-port",
                           str(publishing.port), "-c", "4", "--rate", "50", *SHORT)
    assert status == 0, err
    assert_clean(r)
    assert r["publish_target"] == f"127.0.0.1:{publishing.port}"
    c = r["counts"]
    assert c["subscribers"] == 4 and c["published"] > 0
    assert c["acked"] == c["published"] + 1  # and the end marker
    assert c["delivered"] == c["expected"] == 4 * c["published"]
    assert c["lost"] == c["duplicates"] == c["reordered"] == 0
    # Every message crossed through Redis: the publisher's node has no subscriber.
    for node in (subscribed, publishing):
        assert [line for line in node.bus_lines() if "lost" in line] == []


def test_fanout_catches_a_lost_and_a_duplicated_message(serve):
    server = serve("thread", push_handler(faults=True))
    status, r, _ = bench("fanout", "--port", str(server.server_address[1]), "-c", "3",
                         "--rate", "50", *SHORT)
    assert status == 1
    c = r["counts"]
    assert c["lost"] == 1 and r["errors"]["lost"] == 1
    assert c["duplicates"] == 3 and r["errors"]["duplicates"] == 3
    assert c["delivered"] == c["expected"] - 1


# -- soak against a sockserv push server, and against deliberately lossy ones -------------

SOAK = ("--duration", "2", "--warmup", "0.5", "--grace", "3")


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one-process", "workers"])
def test_soak_loses_nothing_and_exercises_every_fault(cli, workers):
    server = cli("push", "--port", "0", *workers)
    if workers:
        line = server.wait_line(r"supervisor \d+: 2 \w+ worker\(s\) on ")
        port = int(line.rsplit(":", 1)[1])
        server.wait_line(r"worker\(s\) serving")
    else:
        port = server.wait_serving()
    done = run_cli("bench", "soak", "--port", str(port), *SOAK, "--fault-rate", "4",
                   "--server-pid", str(server.proc.pid), "--max-rss-growth", "50",
                   "--json", "--progress", timeout=60)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert_clean(r)
    c = r["counts"]
    assert c["connected"] == 32 + 4 + 4  # subscribers, publishers, pingers
    assert c["subscribers"] == 32 and c["late_subscribers"] == 8
    assert c["published"] == c["accepted"] > 0
    assert c["delivered"] == c["expected"] > c["accepted"]
    assert c["lost"] == c["duplicates"] == c["reordered"] == 0
    assert c["pings"] == c["round_trips"] > 0
    assert set(r["faults"]) == {"reset_write", "reset_read", "half_close", "garbage",
                                "long_line", "burst", "slow_reader", "dribble", "sub_churn"}
    for kind, f in r["faults"].items():
        assert f["run"] > 0 and f["failed"] == 0, (kind, f)
        assert f["ok"] + f["shed"] == f["run"], (kind, f)
    assert r["faults"]["slow_reader"]["shed"] > 0  # 8 MiB unread: the server let it go
    assert r["faults"]["dribble"]["ok"] == r["faults"]["dribble"]["run"]  # no idle_timeout
    assert r["faults"]["burst"]["run"] % 10 == 0
    assert set(r["errors"]) == {"mismatches", "resets", "timeouts", "connect_errors",
                                "protocol", "faults", "lost", "duplicates", "reordered"}
    s = r["server"]
    assert s["rss_start_bytes"] > 0 and s["rss_end_bytes"] > 0 and s["rss_ok"]
    assert s["rss_limit_pct"] == 50 and isinstance(s["rss_change_pct"], float)
    assert s["processes"] == s["processes_start"] == (3 if workers else 1)
    assert set(r["delivery_latency_us"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert (r["channels"], r["publishers"], r["pingers"], r["fault_rate"]) == (4, 4, 4, 4.0)
    # (run_cli reads text: the progress line's \r arrives as a line break)
    assert re.search(r"^\[ *\d+\.\ds\] soak  [\d,]+ round trips/s .* delivered [\d,]+  faults "
                     r"[\d,]+  errors 0\x1b\[K$", done.stderr, re.M), done.stderr


def lossy_push(mode):
    """sockserv's push handler, broken on purpose: ``drop`` answers every 10th PUB to an
    accounted channel with +OK but publishes nothing; ``pong`` garbles every 10th +PONG."""
    counter = itertools.count(1)

    class LossyPush(sockserv.PushHandler):
        def line_received(self, line):
            if mode == "drop" and line.startswith(b"PUB bench.") and b".slow." not in line:
                if next(counter) % 10 == 0:
                    self.conn.write(b"+OK\n")
                    return
            if mode == "pong" and line.startswith(b"PING ") and next(counter) % 10 == 0:
                self.conn.write(b"+PONG garbled\n")
                return
            super().line_received(line)

    return LossyPush


def test_soak_reports_messages_a_server_lost(serve):
    server = serve("select", lossy_push("drop"))
    done = run_cli("bench", "soak", "--port", str(server.server_address[1]), *SOAK,
                   "--fault-rate", "0", "--grace", "1", "--rate", "200", timeout=60)
    assert done.returncode == 1
    assert "sockserv: bench failed" in done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert {"throughput", "pings", "push", "delivery", "faults", "errors", "client"} <= set(rows)
    lost = int(re.search(r"lost ([\d,]+)", rows["push"]).group(1).replace(",", ""))
    assert lost > 0 and f"lost {lost:,}" in rows["errors"]
    expected, delivered = (int(re.search(rf"{word} ([\d,]+)", rows["push"]).group(1)
                               .replace(",", "")) for word in ("expected", "delivered"))
    assert delivered + lost == expected


def test_soak_catches_a_garbled_pong(serve):
    server = serve("select", lossy_push("pong"))
    status, r, _ = bench("soak", "--port", str(server.server_address[1]), *SOAK,
                         "--fault-rate", "0")
    assert status == 1 and not r["ok"]
    assert r["errors"]["mismatches"] > 0 and r["first_error"].startswith("mismatches: ")
    assert r["counts"]["round_trips"] < r["counts"]["pings"]
    assert r["counts"]["lost"] == 0


def stamps(*values):
    return array.array("q", values).tobytes()


def test_soak_accounting_counts_what_came_after_each_subscription():
    # publisher 0: five messages stamped 10..50, all accepted, end marker stamped 60
    pubs = {0: (5, stamps(10, 20, 30, 40, 50), True, 60)}

    def account(*subs):
        return soak_accounting([{"pubs": pubs, "subs": list(subs)}])

    # (publisher, +OK time, first seen, next due, gaps, end marker seen)
    assert account((0, 5, 0, 5, [], True)) == {
        "expected": 6, "delivered": 6, "lost": 0, "incomplete": 0}
    # subscribed at 25: messages 2..4 and the end marker are due; 1 came anyway, not counted
    assert account((0, 25, 1, 5, [], True))["lost"] == 0
    assert account((0, 25, 2, 5, [], True))["expected"] == 4
    assert account((0, 25, 3, 5, [], True))["lost"] == 1  # message 2 never came
    assert account((0, 25, 2, 5, [3], True))["lost"] == 1  # a gap
    assert account((0, 25, 2, 4, [], False))["lost"] == 2  # the tail and the end marker
    assert account((0, 5, -1, -1, [], False))["lost"] == 6  # nothing at all
    assert account((0, 55, -1, -1, [], True))["expected"] == 1  # only the end marker
    assert account((1, 5, -1, -1, [], False))["expected"] == 0  # a publisher never connected
    assert soak_accounting([None])["incomplete"] == 1


def test_soak_fails_when_the_server_rss_grows_past_the_limit():
    opts = Options(workload="soak", server_pid=1, max_rss_growth=10.0)
    counts = {"window": 10, "round_trips": 10, "pings": 10, "expected": 5, "delivered": 5}
    sample = {"cpu": 1.0, "rss": 100 << 20, "hwm": 120 << 20, "processes": 1, "t": 0}

    def result(rss_end):
        end = dict(sample, rss=rss_end, t=10**9)
        return build_result(opts, counts, Histogram(), 1.0, "", False, None, sample, end, 0.0,
                            0.0, Histogram())

    flat = result(109 << 20)
    assert flat["ok"] and flat["server"]["rss_ok"] and flat["server"]["rss_change_pct"] == 9.0
    grown = result(111 << 20)
    assert not grown["ok"] and not grown["server"]["rss_ok"] and grown["error_count"] == 0
    assert "(+11.0%, limit 10%: EXCEEDED)" in format_summary(grown)


# -- output: JSON shape, summary table, progress line ------------------------------------


def test_json_output_is_one_object_with_the_documented_keys(echo_server):
    port, pid = echo_server()
    done = run_cli("bench", "pingpong", "--port", str(port), "-c", "2", *SHORT, "--json",
                   "--server-pid", str(pid))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    r = json.loads(done.stdout)
    assert set(r) >= {"workload", "target", "proto", "connections", "size", "pipeline", "procs",
                      "duration", "warmup", "window_s", "messages", "per_second", "latency_us",
                      "counts", "errors", "error_count", "server", "client_cpu_s", "ok"}
    assert set(r["latency_us"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert set(r["errors"]) == {"mismatches", "resets", "timeouts", "connect_errors", "protocol"}
    assert set(r["server"]) >= {"pid", "cpu_s", "cpu_per_message_us", "rss_bytes",
                                "peak_rss_bytes", "processes"}
    assert r["target"] == f"127.0.0.1:{port}" and r["workload"] == "pingpong"


def test_summary_table(echo_server):
    port, pid = echo_server()
    done = run_cli("bench", "pingpong", "--port", str(port), "-c", "2", *SHORT,
                   "--server-pid", str(pid))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert set(rows) == {"throughput", "latency", "messages", "errors", "server", "client"}
    assert "messages/s" in rows["throughput"]
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        assert f" {key} " in rows["latency"]
    assert rows["errors"].split()[1] == "none"
    assert f"pid {pid}" in rows["server"] and "CPU per message" in rows["server"]
    assert "\r" not in done.stderr  # not a terminal: no progress line


def read_pty_until_exit(master, proc, timeout=30.0):
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no end of output in {timeout}s: {b''.join(chunks)!r}")
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every copy of the terminal's other side is closed
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(10)
    return b"".join(chunks).decode()


def test_progress_line_on_a_terminal(echo_server):
    port, _ = echo_server()
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sockserv", "bench", "pingpong", "--port",
                             str(port), "-c", "2", "--duration", "1.3", "--warmup", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            env=bench_env())
    os.close(slave)
    try:
        shown = read_pty_until_exit(master, proc)
    finally:
        os.close(master)
        summary = proc.stdout.read().decode()
        proc.stdout.close()
    assert proc.returncode == 0, shown
    assert re.search(r"\r\[ *\d+\.\ds\] pingpong  ", shown), shown
    line = shown.split("\r[", 1)[1]
    assert " msg/s  p50 " in line and "  p99 " in line and "errors 0" in line
    assert shown.endswith("\r\x1b[K")  # cleared before the summary
    assert "throughput" in summary


def test_ctrl_c_stops_early_and_still_reports(echo_server):
    port, _ = echo_server()
    proc = subprocess.Popen([sys.executable, "-m", "sockserv", "bench", "pingpong", "--port",
                             str(port), "-c", "2", "--duration", "60", "--warmup", "0",
                             "--progress", "--json"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=bench_env())
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while b"msg/s" not in seen:  # the first progress line: the load is running
            ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
            assert ready, seen
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, seen
            seen += chunk
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    r = json.loads(out)
    assert r["interrupted"] and not r["ok"]
    assert r["messages"] > 0 and r["window_s"] < 60
    assert r["counts"]["sent"] == r["counts"]["verified"]  # the runs in flight were drained


# -- the histogram -----------------------------------------------------------------------


def test_histogram_small_values_are_exact():
    h = Histogram()
    for v in range(1, 101):
        h.record(v)
    assert (h.percentile(50), h.percentile(99), h.percentile(100), h.max) == (50, 99, 100, 100)
    assert h.summary()["mean"] == round(50.5 / 1000, 1)


@given(st.integers(min_value=0, max_value=2**62))
def test_histogram_buckets_are_within_half_a_percent(value):
    index = Histogram.index(value)
    assert 0 <= index < Histogram.SIZE
    assert abs(Histogram.value(index) - value) <= max(1, value) / 256 + 1
    h = Histogram()
    h.record(value)
    assert h.counts[index] == 1  # record()'s inlined arithmetic agrees with index()


@given(st.lists(st.integers(min_value=0, max_value=10**10), min_size=1, max_size=200),
       st.lists(st.integers(min_value=0, max_value=10**10), min_size=1, max_size=200))
def test_histograms_merge(a, b):
    ha, hb, both = Histogram(), Histogram(), Histogram()
    for v in a:
        ha.record(v)
        both.record(v)
    for v in b:
        hb.record(v)
        both.record(v)
    ha.merge(hb.state())
    assert ha.counts == both.counts and ha.n == both.n and ha.max == both.max == max(a + b)
    assert ha.percentile(99) == both.percentile(99)


# -- the comparison script's table and chart, on canned numbers ----------------------------


def load_compare():
    path = ROOT / "examples" / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("sockserv_compare", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def canned(server, workload, per_second, p50=100.0, p99=900.0, cpu=10.0, errors=0, rss=None):
    result = {"per_second": per_second, "error_count": errors,
              "latency_us": {"p50": p50, "p99": p99},
              "server": {"cpu_per_message_us": cpu, "rss_per_connection": rss}}
    return {"server": server, "workload": workload, "result": result, "error": None}


def test_compare_table_has_medians_ratios_and_spread():
    compare = load_compare()
    work = compare.workloads()
    records = [
        canned("asyncio Protocol", "pingpong-50", v, p99=p) for v, p in
        [(10000, 900), (11000, 1000), (12000, 1100)]
    ] + [
        canned("sockserv select", "pingpong-50", v, cpu=5.0) for v in (20000, 26000, 22000)
    ] + [
        canned("sockserv fork", "pingpong-50", 1000, errors=1),
        {"server": "sockserv fork", "workload": "pingpong-50", "result": None,
         "error": "server exited with status 1"},
        canned("asyncio Protocol", "hold", None, rss=1800.0),
        canned("sockserv select", "hold", None, rss=450.0),
        canned("asyncio push", "fanout", 100000, p99=8000.0),
        canned("sockserv select", "fanout", 100000, p99=2000.0),
    ]
    summaries = compare.summarize(records, work)
    s = summaries["pingpong-50"]["sockserv select"]
    assert (s.median, s.low, s.high, s.runs, s.cpu_us) == (22000, 20000, 26000, 3, 5.0)
    table = compare.markdown_table(summaries, work, ["sockserv select", "sockserv fork",
                                                     "asyncio Protocol"])
    lines = table.splitlines()
    select_row = next(line for line in lines if line.startswith("| sockserv select |"))
    assert select_row.split(" | ")[1:4] == ["22,000", "2.00", "20,000–26,000 (±14%)"]
    assert "| **asyncio Protocol** | 11,000 | 1.00 | 10,000–12,000 (±9%) | 100 µs | 1.00 ms" \
        in table
    fork_row = next(line for line in lines if line.startswith("| sockserv fork |"))
    assert fork_row.endswith("| 1 (1 failed run) |")
    hold_row = next(line for line in lines if line.startswith("| sockserv select | 450 |"))
    assert "| 0.25 |" in hold_row  # RSS: the ratio is to asyncio's 1,800 B (lower is better)
    assert "lower is better" in table
    fanout = table[table.index("fan-out"):]
    assert "| sockserv select | 2,000 | 0.25 |" in fanout  # p99 latency: lower is better
    # the order of the tables follows the workloads; servers follow the given order
    assert table.index("ping-pong, 50") < table.index("idle connections")
    assert table.index("| sockserv select |") < table.index("| sockserv fork |")


def test_compare_svg_is_well_formed_with_one_bar_per_measured_server():
    compare = load_compare()
    work = compare.workloads()
    records = [canned("asyncio Protocol", "pingpong-50", 10000),
               canned("asyncio Protocol", "pingpong-50", 14000),
               canned("sockserv <select> & co", "pingpong-50", 30000),
               {"server": "broken", "workload": "pingpong-50", "result": None, "error": "x"},
               canned("asyncio DatagramProtocol", "udp", 5000)]
    svg = compare.svg_chart(compare.summarize(records, work), work,
                            ["sockserv <select> & co", "asyncio Protocol"], title="t & t")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    bars = [r for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert len(bars) == 3  # two pingpong servers with figures, one udp
    widths = {b.find(f"{ns}title").text.split(":")[0]: float(b.get("width")) for b in bars}
    assert widths["sockserv <select> & co"] > widths["asyncio Protocol"]
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "failed" in texts and "t & t" in texts
    assert any(t and "×2.50" in t for t in texts)  # 30,000 against the median 12,000
    assert len(list(root.iter(f"{ns}path"))) == 1  # the one server with a spread


def load_shared_core():
    sys.path.insert(0, str(ROOT / "examples" / "benchmarks"))  # it imports compare
    try:
        spec = importlib.util.spec_from_file_location(
            "sockserv_shared_core", ROOT / "examples" / "benchmarks" / "shared_core.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_shared_core_reads_cpu_per_message_from_bench_and_from_a_cpu_share():
    shared_core = load_shared_core()
    bench = {"per_second": 50000.0, "server": {"cpu_per_message_us": 9.5}}
    assert shared_core.cpu_per_message(bench) == (9.5, 50000.0)
    other = {"msgs_per_s": 200000.0, "server_cpu": 0.9}  # a client reporting a CPU share
    assert shared_core.cpu_per_message(other) == pytest.approx((4.5, 200000.0))
    with pytest.raises(ValueError, match="no server CPU"):
        shared_core.cpu_per_message({"per_second": 1.0})


CAN_PIN = shutil.which("taskset") is not None and {0, 1} <= os.sched_getaffinity(0)


@pytest.mark.skipif(not CAN_PIN, reason="needs taskset and cores 0 and 1")
@pytest.mark.timeout(150)
def test_shared_core_runs_two_servers_at_once_and_prints_their_ratio():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "benchmarks" / "shared_core.py"),
         "--servers", "sockserv select,asyncio Protocol", "--rounds", "2",
         "--duration", "0.5", "--warmup", "0.2"],
        capture_output=True, text=True, timeout=140, env=bench_env())
    assert done.returncode == 0, done.stderr
    rounds = re.findall(r"round \d: sockserv select ([\d.]+) µs \(([\d,]+)/s\), "
                        r"asyncio Protocol ([\d.]+) µs \(([\d,]+)/s\): CPU per message ([\d.]+)x",
                        done.stdout)
    assert len(rounds) == 2, done.stdout
    for ours, our_rate, theirs, their_rate, ratio in rounds:
        assert float(ours) > 0 and float(theirs) > 0
        assert int(our_rate.replace(",", "")) > 0 and int(their_rate.replace(",", "")) > 0
        assert float(ratio) == pytest.approx(float(ours) / float(theirs), abs=0.002)
    assert re.search(r"sockserv select / asyncio Protocol, median of 2 rounds: "
                     r"CPU per message [\d.]+x", done.stdout)


@pytest.mark.skipif(not CAN_PIN, reason="needs taskset and cores 0 and 1")
@pytest.mark.timeout(120)
def test_shared_core_reports_a_client_without_results_in_one_line_and_exits_1():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "benchmarks" / "shared_core.py"),
         "--rounds", "1", "--duration", "0.5", "--client", "true {port} {pid}"],
        capture_output=True, text=True, timeout=100, env=bench_env())
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "shared_core: round 1: the client of sockserv select printed no JSON (exit 0)"]


def test_shared_core_refuses_a_workload_without_cpu_per_message():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "benchmarks" / "shared_core.py"),
         "--workload", "hold"], capture_output=True, text=True, timeout=60, env=bench_env())
    assert done.returncode == 2
    assert "--workload hold has no CPU per message to compare" in done.stderr


def test_man_page_documents_every_bench_option():
    import argparse

    from sockserv import bench as bench_module

    parser = argparse.ArgumentParser()
    bench_module.add_arguments(parser)
    text = (ROOT / "man" / "sockserv.1").read_text().replace("\\-", "-")
    section = text[text.index(".SH BENCH"):]
    section = section[:section.index("\n.SH ", 1)]
    flags = [s for action in parser._actions for s in action.option_strings
             if s.startswith("--") and s != "--help"]
    assert "--no-progress" in flags
    for flag in flags:
        assert flag in section, flag
    for workload in WORKLOADS:
        assert f".B {workload}\n" in section, workload
