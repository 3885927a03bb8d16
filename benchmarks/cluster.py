"""kvbound on Ray Serve against the single-process server, on this machine: `kvbound serve` vs
`kvbound serve --ray --replicas 1` vs `--replicas 2`, the same model and the same KV budget per replica.

* sessions held: K new named sessions of one turn each; how many still hold KV afterwards (/v1/memory) — the
  sessions a budget keeps resident, per replica and in all.
* routing overhead: sequential GET /v1/models (no model work: the HTTP path only) and 1-token chat turns on a kept
  session; the cluster's extra latency is Serve's proxy → ingress → replica and back.
* throughput: C clients, each with its own named session, send turns back to back (waiting out a 429's Retry-After)
  for S seconds; requests/s in all and per replica (from each response's x-kvbound-replica).

The single-process server stays up beside each cluster, and probes and load alternate between the two (request by
request, and in windows of load), so a shared machine's drifting load hits both alike.

    python -m benchmarks.cluster [--quick] [--model smollm2-135m] [--kv-budget 24MiB] [--clients 4] [--seconds 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.load import Server, free_port
from benchmarks.load import start as load_start

SUITE = "cluster"
SINGLE, RAY1, RAY2 = "kvbound serve", "kvbound serve --ray --replicas 1", "kvbound serve --ray --replicas 2"
NO_STOP_SMOLLM2 = {"0": -100, "1": -100, "2": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>: replies run to max


@dataclass
class System:
    name: str
    replicas: int  # 0: the single-process server

    def argv(self, model: str, kv_budget: str, port: int, data_dir: Path) -> list[str]:
        argv = [sys.executable, "-m", "kvbound", "serve", "--model", model, "--kv-budget", kv_budget, "--host",
                "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
        return argv + (["--ray", "--replicas", str(self.replicas)] if self.replicas else [])


def start(system: System, args: argparse.Namespace, log_file: Any) -> tuple[subprocess.Popen, str]:
    """The server as a subprocess (benchmarks.load.start), ready once a replica answers /v1/models."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="kvbound-cluster-bench-"))
    server = Server(system.name, system.argv(args.model, args.kv_budget, port, data_dir), port, "/v1/models")
    return load_start(server, log_file), server.url


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, as benchmarks.load.stop, with more time: a cluster stops Serve, then its local Ray."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat(client: Any, session: str, text: str, max_tokens: int) -> Any:
    body = {"model": "default", "messages": [{"role": "user", "content": text}], "session_id": session,
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_STOP_SMOLLM2}
    return client.post("/v1/chat/completions", json=body)


def timed_call(fn: Any) -> float:
    started = time.perf_counter()
    fn().raise_for_status()
    return time.perf_counter() - started


def summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"n": len(times), "p50_ms": round(statistics.median(times) * 1e3, 2),
            "mean_ms": round(statistics.fmean(times) * 1e3, 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1e3, 2)}


def overhead(urls: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Sequential probes, alternating between the servers request by request (a shared machine's load drifts:
    alternating gives both the same conditions)."""
    import httpx

    clients = {name: httpx.Client(base_url=url, timeout=120) for name, url in urls.items()}
    models: dict[str, list[float]] = {name: [] for name in urls}
    turns: dict[str, list[float]] = {name: [] for name in urls}
    try:
        for name, client in clients.items():
            for _ in range(5):
                client.get("/v1/models")
            chat(client, "probe", "Hello there.", 1).raise_for_status()
        for _ in range(args.probe_requests):
            for name, client in clients.items():
                models[name].append(timed_call(lambda: client.get("/v1/models")))
        for _ in range(args.probe_turns):
            for name, client in clients.items():
                turns[name].append(timed_call(lambda: chat(client, "probe", "Go on.", 1)))
        for client in clients.values():
            client.delete("/v1/sessions/probe")
    finally:
        for client in clients.values():
            client.close()
    return {name: {"models": summary(models[name]), "one_token_turn": summary(turns[name])} for name in urls}


def throughput(urls: dict[str, str], args: argparse.Namespace, tag: str) -> dict[str, dict[str, Any]]:
    """`clients` clients (one named session each) drive one server at a time, in windows of `window` seconds that
    alternate between the servers until each had `seconds`."""
    import httpx

    stats = {name: {"replicas": Counter(), "refused": 0, "tokens": 0, "elapsed": 0.0} for name in urls}
    lock = threading.Lock()

    def drive(name: str, url: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds

        def client_loop(index: int) -> None:
            with httpx.Client(base_url=url, timeout=300) as client:
                while time.monotonic() < deadline:
                    response = chat(client, f"{tag}-{index}", f"Client {index}: tell me something.", args.max_tokens)
                    with lock:
                        if response.status_code == 200:
                            stats[name]["replicas"][response.headers.get("x-kvbound-replica", "the process")] += 1
                            stats[name]["tokens"] += response.json()["usage"]["completion_tokens"]
                        else:
                            stats[name]["refused"] += 1
                    if response.status_code == 429:  # the pool is held by the other clients' turns: wait, as
                        time.sleep(float(response.headers.get("retry-after", 1)))  # the openai client does
                    elif response.status_code != 200:
                        raise RuntimeError(f"{name}: {response.status_code} {response.text[:300]}")

        started = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats[name]["elapsed"] += time.monotonic() - started

    for _ in range(max(1, round(args.seconds / args.window))):
        for name, url in urls.items():
            drive(name, url, args.window)
    for url in urls.values():
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(args.clients):
                client.delete(f"/v1/sessions/{tag}-{i}")
    result = {}
    for name, s in stats.items():
        answered, elapsed = sum(s["replicas"].values()), s["elapsed"]
        result[name] = {"seconds": round(elapsed, 1), "requests": answered, "refused": s["refused"],
                        "requests_per_s": round(answered / elapsed, 3), "tokens_per_s": round(s["tokens"] / elapsed, 2),
                        "requests_per_s_per_replica": {k: round(v / elapsed, 3)
                                                       for k, v in sorted(s["replicas"].items())}}
    return result


def sessions_held(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        for i in range(args.sessions):
            chat(client, f"held-{i}", f"Session {i}: remember the number {i}.", args.max_tokens).raise_for_status()
        memory = client.get("/v1/memory").json()
        for i in range(args.sessions):
            client.delete(f"/v1/sessions/held-{i}")
    resident = [s for s in memory["sessions"] if s["kv_tokens"] > 0 and s["id"].startswith("held-")]
    per_replica = Counter(s.get("replica", "the process") for s in resident)
    return {"created": args.sessions, "resident": len(resident),
            "resident_per_replica": dict(sorted(per_replica.items())),
            "kv_budget_bytes": memory["pool"]["budget_bytes"], "kv_used_bytes": memory["pool"]["used_bytes"],
            "offloads": memory["engine"]["offloads"]}


def route_ms(url: str) -> float | None:
    """The ingress's own mean time to choose a replica (kvbound_cluster_route_seconds), in ms."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text)
              for s in f.samples if s.name.startswith("kvbound_cluster_route_seconds_")}
    count = values.get("kvbound_cluster_route_seconds_count")
    return round(values["kvbound_cluster_route_seconds_sum"] / count * 1e3, 3) if count else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The single-process server stays up throughout; each cluster size is measured beside it."""
    results: dict[str, Any] = {}
    log_path = Path(tempfile.gettempdir()) / "kvbound-cluster-bench-servers.log"
    common.log(f"the servers' output goes to {log_path}")
    with open(log_path, "w") as log_file:
        single = System(SINGLE, 0)
        common.log(f"-- {SINGLE}: starting")
        started = time.monotonic()
        single_proc, single_url = start(single, args, log_file)
        try:
            results[SINGLE] = {"replicas": 1, "ready_s": round(time.monotonic() - started, 1),
                               "sessions_held": sessions_held(single_url, args), "paired": {}}
            for system in (System(RAY1, 1), System(RAY2, 2)):
                common.log(f"-- {system.name}: starting")
                started = time.monotonic()
                proc, url = start(system, args, log_file)
                ready_s = time.monotonic() - started
                try:
                    urls = {SINGLE: single_url, system.name: url}
                    common.log(f"-- {system.name}: ready in {ready_s:.0f} s; sessions held")
                    held = sessions_held(url, args)
                    common.log(f"-- {system.name}: overhead, alternating with {SINGLE}")
                    probes = overhead(urls, args)
                    common.log(f"-- {system.name}: throughput, {args.clients} clients, alternating with {SINGLE}")
                    load = throughput(urls, args, tag=f"load{system.replicas}")
                    results[system.name] = {"replicas": system.replicas, "ready_s": round(ready_s, 1),
                                            "sessions_held": held, "overhead": probes[system.name],
                                            "throughput": load[system.name], "ingress_route_ms_mean": route_ms(url)}
                    results[SINGLE]["paired"][system.name] = {"overhead": probes[SINGLE], "throughput": load[SINGLE]}
                    mine, theirs = probes[system.name], probes[SINGLE]
                    results[system.name]["routing_overhead_ms"] = {
                        key: round(mine[key]["p50_ms"] - theirs[key]["p50_ms"], 2) for key in mine}
                    results[system.name]["throughput_vs_single"] = round(
                        load[system.name]["requests_per_s"] / load[SINGLE]["requests_per_s"], 2)
                finally:
                    stop(proc)
        finally:
            stop(single_proc)
    return results


def markdown(result: dict[str, Any]) -> str:
    systems = result["systems"]
    rows = []
    for name in (RAY1, RAY2):
        r, single = systems[name], systems[SINGLE]["paired"][name]
        for label, o, t in ((f"{SINGLE} (beside {name.split()[-1]} replica(s))", single["overhead"],
                             single["throughput"]), (name, r["overhead"], r["throughput"])):
            per = ", ".join(f"{k} {v:.2f}" for k, v in t["requests_per_s_per_replica"].items())
            rows.append([label, f"{o['models']['p50_ms']:.1f}", f"{o['one_token_turn']['p50_ms']:.1f}",
                         f"{t['requests_per_s']:.2f}", per, f"{t['tokens_per_s']:.1f}"])
    table = common.markdown_table(["system", "GET /v1/models p50 ms", "1-token turn p50 ms", "requests/s",
                                   "requests/s per replica", "tokens/s"], rows)
    held = common.markdown_table(
        ["system", "KV budget in all", "sessions holding KV (of created)", "per replica", "ready s"],
        [[name, f"{s['sessions_held']['kv_budget_bytes'] / 2**20:.1f} MiB",
          f"{s['sessions_held']['resident']} of {s['sessions_held']['created']}",
          ", ".join(f"{k} {v}" for k, v in s["sessions_held"]["resident_per_replica"].items()), f"{s['ready_s']:.0f}"]
         for name, s in systems.items()])
    extra = "\n".join(f"- {name}: routing overhead vs the single-process server (p50) {_ms(r['routing_overhead_ms'])}; "
                      f"the ingress's own choice of replica {r['ingress_route_ms_mean']} ms mean; requests/s "
                      f"{r['throughput_vs_single']}x the single server's"
                      for name, r in systems.items() if name != SINGLE)
    return f"{table}\n\n{held}\n\n{extra}"


def _ms(overhead: dict[str, float] | float) -> str:
    """Routing overhead per probe ({'models': 10.8, 'one_token_turn': -51.4}) as '10.8 ms (models), ...'."""
    if not isinstance(overhead, dict):
        return f"{overhead} ms"
    return ", ".join(f"{v:+.1f} ms ({k.replace('_', ' ')})" for k, v in overhead.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter load")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kv-budget", default="24MiB", help="each replica's (and the single server's) KV budget")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30, help="load on each server, in all")
    parser.add_argument("--window", type=float, default=5, help="seconds of load before switching servers")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=24, help="sessions created for 'sessions held'")
    parser.add_argument("--probe-requests", type=int, default=200)
    parser.add_argument("--probe-turns", type=int, default=30)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.probe_requests, args.probe_turns = min(args.seconds, 15), 100, 15
    common.pin_threads()
    systems = run(args)
    result = {"config": {k: v for k, v in vars(args).items() if k != "quick"}, "systems": systems,
              "notes": ["the single-process server stays up while each cluster runs; probes alternate between the two "
                        "request by request and load alternates in windows, so both see the same background load "
                        "(the 2-core machine is shared with other jobs: see load_average_at_start); every kvbound "
                        "process computes on one thread",
                        "a cluster replica reserves 1 CPU in Ray: 2 replicas take both cores, and Serve's proxy, the "
                        "ingress, the controller and Ray's own processes share them",
                        "routing overhead = the cluster's p50 minus the single-process server's p50, measured "
                        "alternately"]}
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
