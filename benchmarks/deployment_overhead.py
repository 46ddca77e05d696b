"""What a federated round costs in a real deployment beyond local training.

Starts a real federation on 127.0.0.1 — `fedssl server start` (SuperLink with TLS and node
authentication) and two `fedssl site start` agents — runs a few rounds of the tiny model
and reads, per round, the server's wall time and each site's training time from the run's
metrics.jsonl. Overhead = round wall time − the slower site's training time.

    python benchmarks/deployment_overhead.py                      # the three variants, 6 rounds each
    python benchmarks/deployment_overhead.py --variant fedssl     # one variant
    python benchmarks/deployment_overhead.py --quick              # 2 rounds, smoke only

Variants, run interleaved in one invocation (every Flower setting is a supported flag or variable):
- ``fedssl``: what `fedssl site start` runs — SuperNode ``--isolation process`` and the fedssl
  site runner next to it (fedssl/deploy/site/runner.py): it checks each task's app bundle and
  runs the site's own ClientApp in one long-lived process (torch and Opacus stay loaded),
  polling the SuperNode for tasks every 0.1 s;
- ``flower-process``: the path before the site runner — SuperNode ``--isolation process`` with a
  long-lived ``flower-superexec`` (task poll 0.1 s) that starts a new ClientApp process per
  message and runs the bundle the coordinator sent (started here with raw Flower commands,
  since `fedssl site start` no longer does this);
- ``stock``: Flower's defaults — SuperNode ``--isolation subprocess`` and the default 1 s
  SuperExec poll, also running the bundle.
All three without evaluation round trips (fraction_evaluate=0).

It also times the two parts of a ClientApp cold start that every round pays (a new process
per message): importing Flower's ClientApp runtime, and importing fedssl's ClientApp.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROJECT_ROOT, machine_info, write_result  # noqa: E402
from fedssl import phases  # noqa: E402
from fedssl.layout import RunDir  # noqa: E402
from fedssl.reporting import load_run  # noqa: E402
from fedssl.runlog import read_metrics  # noqa: E402

FEDSSL = str(Path(sys.executable).parent / "fedssl")


def import_seconds(statement: str, reps: int) -> list[float]:
    """Wall time of a fresh interpreter running ``statement`` (what a new ClientApp process pays)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], env=env, check=True, capture_output=True, cwd=PROJECT_ROOT)
        times.append(time.perf_counter() - started)
    return times


FLOWER_VARIANTS = {"flower-process": ("process", "0.1"), "stock": ("subprocess", "1.0")}  # isolation, SuperExec poll


def flower_site_commands(site_yaml: Path, isolation: str) -> tuple[list[str], list[str] | None, dict]:
    """A site as Flower alone runs it (the bundle's ClientApp): SuperNode (+ flower-superexec), env."""
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.supernode import supernode_commands
    from fedssl.run.flower_runtime import STATE_FLOWER_HOME, flower_bin, flower_env, free_port

    config = load_site_config(site_yaml)
    port = free_port()
    supernode, _ = supernode_commands(config, site_yaml, port)
    supernode[supernode.index("--isolation") + 1] = isolation
    (config.state_path / STATE_FLOWER_HOME).mkdir(parents=True, exist_ok=True)
    env = flower_env(config.state_path / STATE_FLOWER_HOME, superexec_poll=None)
    if isolation == "subprocess":
        return supernode, None, env
    return supernode, [flower_bin("flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{port}"], env


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Each process group: SIGTERM, then SIGKILL if it is still there 30 s later."""
    for proc in procs:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=30)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def run_federation(root: Path, variant: str, rounds: int, timeout: float) -> dict:
    from fedssl.deploy.localfed import make_local_federation

    # A round waits for both sites however long a cold start takes on a loaded machine, so every
    # variant is measured round by round instead of timing out (90 s by default in localfed).
    fed = make_local_federation(root, ["site-a", "site-b"], rounds=rounds, local_steps=3,
                                experiment_overrides=["federation.round_timeout=900"])
    # A DP site no longer tells the server its training time (docs/privacy.md): every process of the run
    # marks its phases (fedssl.phases) in one file on this machine, and the sites' site_done marks say it.
    phase_log = root / "phases.jsonl"
    env = dict(os.environ, PYTHONWARNINGS="ignore", **{phases.ENV_VAR: str(phase_log)})
    procs: list[subprocess.Popen] = []
    logs = root / "logs"
    logs.mkdir()

    def start(name: str, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as handle:
            proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**env, **(extra_env or {})}, start_new_session=True)
        procs.append(proc)
        return proc

    def start_site(name: str, path: Path) -> None:
        if variant not in FLOWER_VARIANTS:
            start(name, [FEDSSL, "site", "start", "--config", str(path)])
            return
        isolation, poll = FLOWER_VARIANTS[variant]
        supernode, superexec, site_env = flower_site_commands(path, isolation)
        site_env = {**site_env, "PYTHONWARNINGS": "ignore", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": poll}
        start(f"{name}-supernode", supernode, site_env)
        if superexec is not None:
            start(f"{name}-superexec", superexec, site_env)

    started = time.perf_counter()
    try:
        server = start("server", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
        # sites start once the SuperLink is up: their preflight checks that it is reachable
        deadline = time.monotonic() + 300
        while "registered site site-b" not in (logs / "server.log").read_text() and server.poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"the SuperLink did not come up; see {logs / 'server.log'}")
            time.sleep(0.5)
        for name, path in fed.site_yamls.items():
            start_site(name, path)
        code = server.wait(timeout=timeout)
    finally:
        stop_all(procs)
    total = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"deployment run failed (exit {code}); see {logs / 'server.log'}:\n{(logs / 'server.log').read_text()[-3000:]}")
    run_dir = root / "runs" / f"deploy-{root.name}"
    return {"per_round": round_overheads(run_dir, phase_log), "federation_seconds": load_run(run_dir).summary.get("federation_seconds"),
            "wall_seconds": total}


def round_overheads(run_dir: Path, phase_log: Path) -> list[dict]:
    """Each round's wall time against the slower site's training time (the sites' site_done phase marks)."""
    metrics = RunDir(run_dir).metrics
    _, rounds = read_metrics(metrics)
    site_done = [m for m in phases.read(phase_log) if m["phase"] == "site_done"]
    per_round = []
    for r in rounds:
        train = [float(m["train_s"]) for m in site_done if m["round"] == r.round]
        if len(train) < 2:
            raise SystemExit(f"round {r.round}: only {len(train)} site(s) trained; see {metrics}")
        per_round.append({"round": r.round, "seconds": r.seconds, "max_train_seconds": max(train),
                          "overhead_seconds": r.seconds - max(train), "sites_trained": len(train)})
    return per_round


def describe(rounds: list[dict]) -> dict:
    later = [r["overhead_seconds"] for r in rounds[1:]] or [r["overhead_seconds"] for r in rounds]
    return {
        "overhead_median_s": statistics.median(later),
        "overhead_min_s": min(later),
        "overhead_max_s": max(later),
        "round_median_s": statistics.median([r["seconds"] for r in rounds[1:]] or [r["seconds"] for r in rounds]),
        "train_median_s": statistics.median([r["max_train_seconds"] for r in rounds]),
        "first_round_s": rounds[0]["seconds"],
        "note": "median/min/max over rounds 2..N; round 1 also pays the ServerApp start and the first app install",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, one variant: a smoke run")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variant", action="append", choices=["fedssl", *FLOWER_VARIANTS], help="repeatable; default: all three")
    parser.add_argument("--repeats", type=int, default=1, help="run the variants in turn this many times (the machine's load drifts)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    variants = args.variant or (["fedssl"] if args.quick else ["fedssl", *FLOWER_VARIANTS])
    repeats = 1 if args.quick else args.repeats
    load_before = list(os.getloadavg())
    reps = 1 if args.quick else 3
    cold = {
        "flower_clientapp_runtime_import_s": statistics.median(import_seconds("import flwr.supernode.runtime.run_clientapp", reps)),
        "fedssl_clientapp_import_s": statistics.median(import_seconds("import clients.client_app, opacus", reps)),
        "torch_import_s": statistics.median(import_seconds("import torch", reps)),
        "load_avg_1min": os.getloadavg()[0],
    }
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants:  # interleaved, so a drift in the machine's load hits every variant
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory(prefix=f"fedssl-deploy-{variant}-") as tmp:
                run = run_federation(Path(tmp), variant, rounds, args.timeout)
            run["load_avg_1min_at_start"] = load
            runs[variant].append(run)
            summary = describe(run["per_round"])
            print(f"{variant} (repeat {repeat + 1}, load {load:.1f}): per-round overhead median {summary['overhead_median_s']:.1f} s "
                  f"(round {summary['round_median_s']:.1f} s, training {summary['train_median_s']:.2f} s)", flush=True)
    results = {}
    for variant, variant_runs in runs.items():
        later = [r for run in variant_runs for r in run["per_round"][1:]] or [r for run in variant_runs for r in run["per_round"]]
        first = [run["per_round"][0] for run in variant_runs]
        results[variant] = {**describe(first[:1] + later), "runs": variant_runs}
    payload = {
        "setup": {"sites": 2, "rounds": rounds, "repeats": repeats, "model": "cnn width 8 depth 2, 8x8 digits, 3 DP-SGD steps per round",
                  "transport": "TLS + SuperNode authentication on 127.0.0.1", "fraction_evaluate": 0},
        "machine": {**machine_info(), "load_avg_before": load_before},
        "clientapp_cold_start": cold,
        "variants": results,
        "where_a_round_goes": [
            "SuperNode pickup: an idle SuperNode polls the SuperLink every 3 s (fixed in Flower 1.42): 0-3 s, ~1.5 s on average",
            "task pickup at the site: the fedssl site runner polls every 0.1 s; Flower's SuperExec: FLWR_SUPEREXEC_TASK_POLL_INTERVAL (0.1 s in flower-process, 1 s stock)",
            "ClientApp cold start, every message (flower-process, stock only): a new Python process installs the bundle and imports Flower's runtime and fedssl's ClientApp (torch, opacus, scipy); see clientapp_cold_start. The fedssl site runner keeps them loaded",
            "reply: the SuperNode checks for the ClientApp's reply every 0.5 s, then pushes it over TLS",
            "ServerApp pickup: Grid.send_and_receive polls for replies every 3 s (fixed in Flower 1.42): the round ends on the next multiple of 3 s after the last reply",
        ],
    }
    path = write_result("deployment_overhead", payload, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
