"""smtp2api benchmark (issue 6): throughput, latency, CPU and memory as ratios to a baseline.

    .venv/bin/python bench/run.py [--scenarios text2k,multipart10k,queue,latency,idle,large]
                                  [--repeat 3] [--client auto|smtp-source|builtin]
                                  [--processes 2] [--messages 6000] [--no-uvloop]

Every throughput scenario runs, in the same run and on the same cores, the baseline (a bare
aiosmtpd server answering ``250 OK``, bench/baseline.py) and the gateway (``smtp2api serve``
with a generated config, the http provider pointed at bench/sink.py), alternately, ``repeat``
times each, and reports the medians and their ratio. Figures drift between runs on a shared
VM; ratios within one run hold. ``make bench`` runs the whole set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import messages as corpus
from procstat import Sampler

MB = 1024 * 1024


def measure(server: harness.Server, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``load`` against ``server``; add the server tree's CPU per message and peak RSS."""
    tree = server.tree
    cpu_before = tree.cpu()
    with Sampler(tree) as sampler:
        result = load()
    cpu = tree.cpu() - cpu_before
    result["cpu_ms_per_msg"] = 1000 * cpu / max(1, result["ok"])
    result["cpu_cores"] = cpu / result["seconds"] if result["seconds"] else 0.0
    result["peak_rss_mb"] = sampler.peak / MB
    return result


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tool = harness.smtp_source_path()
        if args.client == "smtp-source" and tool is None:
            sys.exit("smtp-source is not installed (Debian: postfix)")
        self.use_smtp_source = args.client == "smtp-source" or (
            args.client == "auto" and tool is not None
        )
        self.results: dict[str, Any] = {"client": self.client_name, "args": vars(args)}

    @property
    def client_name(self) -> str:
        return "smtp-source" if self.use_smtp_source else "bench/load.py"

    def config(self, **overrides: Any) -> harness.GatewayConfig:
        base = {
            "processes": self.args.processes,
            "uvloop": not self.args.no_uvloop,
            "aiohttp": not self.args.no_aiohttp,
            "concurrency": self.args.delivery_concurrency,
        }
        return harness.GatewayConfig(**(base | overrides))

    def load(self, port: int, message: bytes, count: int, concurrency: int) -> dict[str, Any]:
        if self.use_smtp_source:
            return harness.run_smtp_source(port, message, count, concurrency)
        return harness.run_builtin(port, message, count, concurrency)

    def warm(self, port: int, message: bytes, concurrency: int) -> None:
        self.load(port, message, max(200, self.args.messages // 20), concurrency)

    # --- scenarios ------------------------------------------------------------------------

    def throughput(self, name: str, message: bytes, concurrency: int = 20) -> dict[str, Any]:
        """Baseline vs gateway (hybrid mode, sink 0 ms), alternately, ``repeat`` times."""
        count = self.args.messages
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "gateway": []}
        for _ in range(self.args.repeat):
            with harness.baseline() as server:
                self.warm(server.port, message, concurrency)
                runs["baseline"].append(
                    measure(server, lambda s=server: self.load(s.port, message, count, concurrency))
                )
            with harness.Sink(0) as sink, harness.gateway(self.config(), sink) as server:
                self.warm(server.port, message, concurrency)
                runs["gateway"].append(
                    measure(server, lambda s=server: self.load(s.port, message, count, concurrency))
                )
        out = {side: _median_run(r) for side, r in runs.items()}
        out["ratio"] = out["gateway"]["rate"] / out["baseline"]["rate"]
        out["rates"] = {side: [round(r["rate"]) for r in rs] for side, rs in runs.items()}
        self._print_pair(name, out)
        return out

    def queue(self) -> dict[str, Any]:
        """Queue mode, 200 clients: delivered/s with the API at 50 ms vs at 0 ms."""
        count, concurrency = self.args.messages, 200
        message = corpus.text_message()
        out: dict[str, Any] = {}
        for latency in (0, 50):
            rates = []
            for _ in range(self.args.repeat):
                config = self.config(mode="queue")
                with harness.Sink(latency) as sink, harness.gateway(config, sink) as server:
                    self.warm(server.port, message, concurrency)
                    _wait_drained(server)
                    result = measure(
                        server,
                        lambda s=server: self._until_delivered(s, message, count, concurrency),
                    )
                rates.append(result)
            out[f"{latency}ms"] = _median_run(rates)
            out[f"{latency}ms"]["rates"] = [round(r["rate"]) for r in rates]
        out["ratio"] = out["50ms"]["rate"] / out["0ms"]["rate"]
        print(
            f"queue mode, 200 clients, delivered/s: API 0 ms {out['0ms']['rate']:.0f} "
            f"{out['0ms']['rates']}, 50 ms {out['50ms']['rate']:.0f} {out['50ms']['rates']}"
            f" -> {out['ratio']:.2f}x (target >= 0.90)"
        )
        return out

    def _until_delivered(
        self, server: harness.Server, message: bytes, count: int, concurrency: int
    ) -> dict[str, Any]:
        started = time.perf_counter()
        before = _delivered(server)
        result = self.load(server.port, message, count, concurrency)
        result["smtp_rate"] = result["rate"]
        _wait_drained(server, before + result["ok"])
        result["seconds"] = time.perf_counter() - started
        result["rate"] = result["ok"] / result["seconds"]
        return result

    def latency(self, max_rate: float | None) -> dict[str, Any]:
        """Hybrid mode at half the gateway's maximum throughput: end of DATA to the reply."""
        message = corpus.text_message()
        with harness.Sink(0) as sink, harness.gateway(self.config(), sink) as server:
            self.warm(server.port, message, 20)
            if max_rate is None:
                max_rate = harness.run_builtin(server.port, message, self.args.messages, 20)["rate"]
            rate = max_rate / 2
            count = max(1000, int(rate * 8))
            result = measure(
                server, lambda: harness.run_builtin(server.port, message, count, 200, rate)
            )
        data = {k: v * 1000 for k, v in result["data"].items() if k != "count"}
        result["rate_target"] = rate
        result["data_ms"] = data
        print(
            f"latency, hybrid at {rate:.0f}/s (half of {max_rate:.0f}/s), API 0 ms: end of DATA "
            f"-> reply p50 {data['p50']:.2f} ms, p99 {data['p99']:.2f} ms "
            f"(targets 2 / 10 ms); achieved {result['rate']:.0f}/s"
        )
        return result

    def idle(self, count: int = 10_000) -> dict[str, Any]:
        with harness.Sink(0) as sink, harness.gateway(self.config(), sink) as server:
            tree = server.tree
            before_rss, before_pss = tree.rss(), tree.pss()
            with harness.idle_connections(server.port, count) as info:
                time.sleep(1.0)
                rss, pss = tree.rss(), tree.pss()
        out = {
            "held": info.get("held"),
            "errors": info.get("errors"),
            "rss_mb": rss / MB,
            "pss_mb": pss / MB,
            "rss_before_mb": before_rss / MB,
            "pss_before_mb": before_pss / MB,
        }
        print(
            f"idle: {out['held']} connections held: gateway RSS {out['rss_mb']:.0f} MB "
            f"(PSS {out['pss_mb']:.0f} MB; {out['rss_before_mb']:.0f} MB before) "
            "(target <= 300 MB)"
        )
        return out

    def large(self, size: int = 25_000_000, provider: str = "http") -> dict[str, Any]:
        message = corpus.large_message(size)
        small = corpus.text_message()
        config = self.config(processes=1, provider=provider)
        with harness.Sink(0) as sink, harness.gateway(config, sink) as server:
            self.warm(server.port, small, 4)
            tree = server.tree
            before = tree.rss()
            result = measure(server, lambda: harness.run_builtin(server.port, message, 1, 1))
        growth = result["peak_rss_mb"] - before / MB
        out = {
            "size_mb": len(message) / MB,
            "rss_before_mb": before / MB,
            "peak_rss_mb": result["peak_rss_mb"],
            "growth_mb": growth,
            "growth_ratio": growth / (len(message) / MB),
            "replies": result.get("replies"),
            "provider": provider,
        }
        print(
            f"large ({provider}): one {out['size_mb']:.1f} MiB message: "
            f"RSS {out['rss_before_mb']:.0f} -> {out['peak_rss_mb']:.0f} MiB, "
            f"growth {growth:.0f} MiB = {out['growth_ratio']:.2f}x the message (target <= 3x), "
            f"replies {out['replies']}"
        )
        return out

    def _print_pair(self, name: str, out: dict[str, Any]) -> None:
        for side in ("baseline", "gateway"):
            r = out[side]
            lat = r.get("session") or {}
            lat_text = (
                f" session p50 {lat['p50'] * 1000:.1f} ms p99 {lat['p99'] * 1000:.1f} ms"
                if lat
                else ""
            )
            print(
                f"{name:13} {side:8} {r['rate']:7.0f} msg/s  cpu {r['cpu_ms_per_msg']:.2f} ms/msg"
                f" ({r['cpu_cores']:.2f} cores)  peak RSS {r['peak_rss_mb']:.0f} MB{lat_text}"
            )
        print(f"{name:13} ratio    {out['ratio']:.2f}x  runs {out['rates']}")


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (so its CPU and RSS belong to the same run)."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    return dict(ordered[len(ordered) // 2])


def _delivered(server: harness.Server) -> float:
    """Accepted deliveries so far, from the gateway's Prometheus metrics."""
    total = 0.0
    for page in server.metrics():
        for line in page.splitlines():
            if line.startswith("smtp2api_delivery_attempts_total{") and 'outcome="success"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_drained(server: harness.Server, target: float | None = None) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if target is not None and _delivered(server) >= target:
            return
        if target is None and _spool_empty(server.metrics()[0]):
            return
        time.sleep(0.05)
    raise RuntimeError("the spool did not drain")


def _spool_empty(metrics: str) -> bool:
    for line in metrics.splitlines():
        if line.startswith("smtp2api_spool_messages{") and 'state="queued"' in line:
            return float(line.rsplit(" ", 1)[1]) == 0
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios", default="text2k,multipart10k,queue,latency,idle,large", help="comma list"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; medians reported")
    parser.add_argument("--client", choices=["auto", "smtp-source", "builtin"], default="auto")
    parser.add_argument("--processes", type=int, default=2, help="gateway [smtp] processes")
    parser.add_argument("--messages", type=int, default=6000, help="messages per measured run")
    parser.add_argument("--delivery-concurrency", type=int, default=256)
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument("--large-size", type=int, default=25_000_000)
    parser.add_argument("--no-uvloop", action="store_true", help="hide uvloop from the gateway")
    parser.add_argument(
        "--no-aiohttp", action="store_true", help="hide aiohttp: httpx's own connection pool"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    bench = Bench(args)
    chosen = args.scenarios.split(",")
    print(f"load generator: {bench.client_name}; gateway processes: {args.processes}")
    results = bench.results
    if "text2k" in chosen:
        results["text2k"] = bench.throughput("text 2 KB", corpus.text_message())
    if "multipart10k" in chosen:
        results["multipart10k"] = bench.throughput("multipart 10KB", corpus.multipart_message())
    if "queue" in chosen:
        results["queue"] = bench.queue()
    if "latency" in chosen:
        known = results.get("text2k", {}).get("gateway", {}).get("rate")
        results["latency"] = bench.latency(known)
    if "idle" in chosen:
        results["idle"] = bench.idle(args.idle_connections)
    if "large" in chosen:
        results["large"] = bench.large(args.large_size)
        # Mailgun takes at most 25,000,000 bytes, the gateway's Received: header included.
        results["large_raw_mime"] = bench.large(args.large_size - 100_000, provider="mailgun")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
