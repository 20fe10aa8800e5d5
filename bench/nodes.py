"""Scale out (issue 8): gateway throughput with one and several nodes on one PostgreSQL spool,
as a ratio to one node on the SQLite spool, in the same run on the same cores.

    .venv/bin/python bench/nodes.py [--nodes 1,2,3] [--messages 6000] [--concurrency 60]
                                    [--mode queue] [--sink-ms 0] [--repeat 1] [--json PATH]

Every node is a real ``smtp2api serve`` process (bench/harness.py) with the http provider
pointed at bench/sink.py; PostgreSQL is a durable throwaway cluster (``fsync=on``,
tests/support/pg.py). The clients (``smtp-source`` when installed, else bench/load.py) are
spread over the nodes as a TCP balancer would: ``--concurrency`` sessions in all, an equal
share per node. Reported per setup: messages accepted per second (SMTP ``250``), messages
delivered per second (until the last one reached the API), PostgreSQL transactions committed
per second over the run, and the delivered rate's ratio to SQLite on one node.

On one machine every node, the database and the load share the same cores: more nodes than
cores measures contention, and the PostgreSQL commit rate printed next to it says how far the
database itself was from its bound. docs/scaling.md reads these figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402
import messages as corpus  # noqa: E402
from tests.support.pg import PgCluster, start_cluster  # noqa: E402


def _delivered(servers: list[harness.Server]) -> float:
    """Accepted deliveries so far on every node, from their Prometheus metrics."""
    total = 0.0
    for server in servers:
        for page in server.metrics():
            for line in page.splitlines():
                if line.startswith("smtp2api_delivery_attempts_total{") and (
                    'outcome="success"' in line
                ):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_delivered(servers: list[harness.Server], target: float, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _delivered(servers) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the spool did not drain: {_delivered(servers)} of {target}")
        time.sleep(0.05)


def _commits(cluster: PgCluster | None, dbname: str | None) -> int:
    if cluster is None or dbname is None:
        return 0
    sql = f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{dbname}'"
    return int(cluster.psql(sql) or 0)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smtp_source = harness.smtp_source_path() is not None and not args.builtin
        self.message = corpus.text_message()

    def load(self, port: int, count: int, concurrency: int) -> dict[str, Any]:
        if self.smtp_source:
            return harness.run_smtp_source(port, self.message, count, concurrency)
        return harness.run_builtin(port, self.message, count, concurrency)

    def spread(self, servers: list[harness.Server], count: int) -> dict[str, Any]:
        """``count`` messages over all nodes at once, an equal share each; the slowest sets
        the time, as for clients behind one balancer."""
        share = max(1, self.args.concurrency // len(servers))
        results: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def run(server: harness.Server) -> None:
            try:
                results.append(self.load(server.port, count // len(servers), share))
            except BaseException as exc:  # re-raised below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in servers]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        seconds = time.perf_counter() - started
        ok = sum(int(r["ok"]) for r in results)
        return {"ok": ok, "seconds": seconds, "rate": ok / seconds}

    def setup(self, sink: harness.Sink, nodes: int, cluster: PgCluster | None) -> dict[str, Any]:
        """One measured run: ``nodes`` gateways (SQLite when ``cluster`` is None)."""
        url = cluster.new_database("nodes") if cluster is not None else None
        dbname = url.rsplit("/", 1)[1] if url else None
        with contextlib.ExitStack() as stack:
            servers = []
            for index in range(nodes):
                extra = {"spool": {"url": url, "node_id": f"node{index}"}} if url else {}
                config = harness.GatewayConfig(mode=self.args.mode, extra=extra)
                servers.append(stack.enter_context(harness.gateway(config, sink)))
            before = _delivered(servers)
            warm = self.spread(servers, max(200, self.args.messages // 20))
            _wait_delivered(servers, before + warm["ok"])
            before, commits = _delivered(servers), _commits(cluster, dbname)
            started = time.perf_counter()
            smtp = self.spread(servers, self.args.messages)
            _wait_delivered(servers, before + smtp["ok"])
            seconds = time.perf_counter() - started
            commits = _commits(cluster, dbname) - commits
        return {
            "spool": "postgresql" if cluster else "sqlite",
            "nodes": nodes,
            "accepted_per_s": smtp["rate"],
            "delivered_per_s": smtp["ok"] / seconds,
            "pg_commits_per_s": commits / seconds if cluster else None,
        }

    def run(self) -> list[dict[str, Any]]:
        node_counts = [int(n) for n in self.args.nodes.split(",") if n]
        try:
            cluster = start_cluster(durable=True)
        except LookupError as exc:
            sys.exit(f"bench/nodes.py needs PostgreSQL: {exc}")
        print(
            f"{self.args.messages} messages ({len(self.message)} B), {self.args.concurrency} "
            f"sessions spread over the nodes, {self.args.mode} mode, API {self.args.sink_ms} ms, "
            f"client {'smtp-source' if self.smtp_source else 'bench/load.py'}, "
            f"{os.cpu_count()} CPUs"
        )
        setups: list[tuple[int, PgCluster | None]] = [(1, None)]
        setups += [(n, cluster) for n in node_counts]
        runs: dict[str, list[dict[str, Any]]] = {}
        try:
            with harness.Sink(self.args.sink_ms) as sink:
                for _ in range(self.args.repeat):  # alternate the setups on each repeat
                    for nodes, pg in setups:
                        result = self.setup(sink, nodes, pg)
                        runs.setdefault(f"{result['spool']} x{nodes}", []).append(result)
        finally:
            cluster.stop()
        return self.report(runs)

    def report(self, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        def median(rs: list[dict[str, Any]], key: str) -> float | None:
            values = [r[key] for r in rs if r[key] is not None]
            return statistics.median(values) if values else None

        base = median(runs["sqlite x1"], "delivered_per_s") or 1.0
        out = []
        for name, rs in runs.items():
            delivered = median(rs, "delivered_per_s") or 0.0
            commits = median(rs, "pg_commits_per_s")
            row = {
                "setup": name,
                "accepted_per_s": round(median(rs, "accepted_per_s") or 0.0),
                "delivered_per_s": round(delivered),
                "pg_commits_per_s": None if commits is None else round(commits),
                "ratio_to_sqlite_x1": round(delivered / base, 3),
                "delivered_runs": [round(r["delivered_per_s"]) for r in rs],
            }
            out.append(row)
            pg = f"{row['pg_commits_per_s']:>6} commits/s" if commits is not None else " " * 16
            print(
                f"{name:<16} accepted {row['accepted_per_s']:>6}/s  delivered "
                f"{row['delivered_per_s']:>6}/s {row['delivered_runs']}  {pg}  "
                f"{row['ratio_to_sqlite_x1']:>5.2f}x sqlite x1"
            )
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,3", help="PostgreSQL node counts")
    parser.add_argument("--messages", type=int, default=6000, help="per setup and repeat")
    parser.add_argument("--concurrency", type=int, default=60, help="sessions, all nodes")
    parser.add_argument("--mode", default="queue", choices=["queue", "hybrid"])
    parser.add_argument("--sink-ms", type=float, default=0.0, help="the API's answer delay")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--builtin", action="store_true", help="bench/load.py, not smtp-source")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="smtp2api-bench-nodes-")
    Path(workdir).chmod(0o711)  # as root, the cluster runs as postgres: let it in
    tempfile.tempdir = workdir  # the cluster's data directory and the nodes' go there
    try:
        rows = Bench(args).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
