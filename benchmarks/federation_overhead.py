"""Federation overhead in simulation: wall time of a 10-site `flwr run` vs pure training time.

Measured in one run, on this machine:

* ``flower``: the real path (`fedssl simulate`'s launcher, fedssl.run.simulation: SuperLink, FAB, Ray,
  ServerApp, ClientApps) for the demo encoder with 10 sites; wall time, the ServerApp's own
  time, per-round times, the sites' reported training seconds, and a timeline of start-up
  phases from ``FEDSSL_PHASE_LOG`` marks (fedssl/phases.py) in every process of the run;
* ``replay``: the same site-rounds called in-process, one after the other, exactly as the
  ClientApp calls them (``train_round``): the sum of the DP-SGD step time is the *pure
  training time*; the rest of ``train_round`` is budget bookkeeping and Opacus set-up;
* micro costs: a fresh process importing the apps, ``ray.init``, the FAB from the checkout vs the staged
  app, cold data loading + partitioning, one encoder (de)serialization. A site round that did not train stops it.

Ratio = flower wall / sum of the sites' training seconds reported in that run. With two workers on two cores the
ideal is ~0.5, on a loaded machine ~1.0. Target <= 1.10.

    python benchmarks/federation_overhead.py            # 10 sites x 5 rounds (~10 min)
    python benchmarks/federation_overhead.py --quick    # 2 sites x 2 rounds in-process only
    python benchmarks/federation_overhead.py --rounds-sweep 5 10 20   # ratio vs run length (~8 min)

The sweep separates what a run pays once (Flower and Ray start-up and shutdown, the workers' imports, the first
round's set-up) from what it pays per round: the ratio is at most the target from fixed + n * round <= 1.10 * n * train.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_POLICY_OVERRIDES, PROJECT_ROOT, machine_info, quiet_warnings, require_every_sampled_site_trained, write_result,
)

DEMO = PROJECT_ROOT / "configs" / "experiments" / "digits-demo.yaml"
TINY = PROJECT_ROOT / "configs" / "experiments" / "digits-tiny.yaml"
TARGET = 1.10


def _config(path: Path, sites: int, rounds: int, out_dir: Path, name: str):
    from fedssl.config import load_config
    from fedssl.experiment import central_data_for

    config = load_config(path, [f"federation.num_sites={sites}", f"federation.rounds={rounds}", f"federation.min_sites={sites}",
                                f"run.output_dir={out_dir}", f"run.name={name}", *BENCH_POLICY_OVERRIDES])
    if not config.model.input_shape:
        config.model.input_shape = list(central_data_for(config).train.input_shape)
    return config


# ------------------------------------------------------------------------ in-process replay


def replay(config, state_root: Path) -> dict:
    """Every site-round of the run, in-process and sequential, as the ClientApp would call it."""
    import torch

    from fedssl.experiment import central_data_for, site_partitions, site_settings
    from fedssl.data.partition import make_site_dataset
    from fedssl.models import encoder_for
    from fedssl.training.local import train_round
    from fedssl.fl.plan import plan_from_config

    data = central_data_for(config)
    parts = site_partitions(config)
    state = encoder_for(config.model, seed=config.run.seed).state_dict()
    plan = plan_from_config(config, run_id="replay")  # the plan the real run's coordinator sends, readout included
    steps_s = round_s = 0.0
    per_round = []
    for server_round in range(1, config.federation.rounds + 1):
        round_steps = round_total = 0.0
        for site_id in range(config.federation.num_sites):
            dataset = make_site_dataset(data.train, parts[site_id])
            started = time.perf_counter()
            result = train_round(dataset, state, plan.with_round(server_round), site_settings(config, state_root, site_id))
            round_total += time.perf_counter() - started
            round_steps += result.train_seconds
        per_round.append({"round": server_round, "steps_s": round_steps, "train_round_s": round_total})
        steps_s += round_steps
        round_s += round_total
    torch.set_num_threads(torch.get_num_threads())
    return {"steps_s": steps_s, "train_round_s": round_s, "bookkeeping_s": round_s - steps_s, "per_round": per_round}


# ------------------------------------------------------------------------ flower run


def phase_timeline(path: Path) -> dict:
    """Start-up phases of one run from its FEDSSL_PHASE_LOG marks, in seconds after `run_federation` began."""
    from fedssl.phases import read

    marks = read(path)
    start = next((m["t"] for m in marks if m["phase"] == "driver_start"), None)
    if start is None:
        return {}

    def first(phase: str) -> float | None:
        times = [m["t"] - start for m in marks if m["phase"] == phase]
        return min(times) if times else None

    at = {phase: first(phase) for phase in ("superlink_ready", "run_submitted", "simulation_started", "server_main",
                                             "server_first_round", "client_modules_loading", "server_done", "driver_done")}
    workers: dict[int, dict] = {}
    for m in marks:
        w = workers.setdefault(m["pid"], {})
        if m["phase"] in ("client_modules_loading", "client_modules_loaded") and m["phase"] not in w:
            w[m["phase"]] = m["t"] - start
        elif m["phase"] == "site_start" and "site_start" not in w:
            w["site_start"] = m["t"] - start
        elif m["phase"] == "site_done" and "first_site_done" not in w:
            w["first_site_done"], w["first_site_train_s"] = m["t"] - start, float(m.get("train_s", 0.0))
    workers = {pid: w for pid, w in workers.items() if "client_modules_loading" in w}

    def gap(a: str, b: str) -> float | None:
        return None if at[a] is None or at[b] is None else at[b] - at[a]

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    durations = {
        "flwr_cli_and_superlink_start_s": at["superlink_ready"],
        "fab_build_and_submit_s": gap("superlink_ready", "run_submitted"),
        "simulation_process_start_s": gap("run_submitted", "simulation_started"),
        "serverapp_import_and_setup_s": gap("simulation_started", "server_first_round"),
        "ray_init_and_actor_start_s": gap("server_first_round", "client_modules_loading"),
        "worker_import_training_stack_s": mean([w["client_modules_loaded"] - w["client_modules_loading"]
                                                for w in workers.values() if "client_modules_loaded" in w]),
        "worker_first_site_overhead_s": mean([w["first_site_done"] - w["site_start"] - w["first_site_train_s"]
                                              for w in workers.values() if "first_site_done" in w and "site_start" in w]),
        "tail_after_server_done_s": gap("server_done", "driver_done"),
    }
    return {"at_s": at, "durations_s": durations, "workers": list(workers.values())}


def _noise_multipliers(run_dir: Path) -> list[float]:
    """The distinct σ the sites calibrated (read through the sites' accountant, its state file's owner)."""
    from fedssl.errors import PrivacyError
    from fedssl.layout import RunDir
    from fedssl.privacy.accountant import load_accountant

    found = set()
    for state_dir in (path for path in RunDir(run_dir).sites.glob("*") if path.is_dir()):
        try:
            state = load_accountant(state_dir)
        except PrivacyError:  # unreadable: not a σ to report
            continue
        if state is not None:
            found.add(state.mechanism.noise_multiplier)
    return sorted(found)


def flower_run(config, tmp: Path) -> dict:
    from fedssl import phases
    from fedssl.layout import RunDir
    from fedssl.run.pipeline import prepare_run_dir
    from fedssl.run.server_marks import read_done
    from fedssl.run.simulation import Simulation
    from fedssl.runlog import read_metrics

    run_dir = prepare_run_dir(config, overwrite=True)
    phase_log = tmp / f"{config.run.name}.phases.jsonl"
    phase_log.unlink(missing_ok=True)
    with mock.patch.dict(os.environ, {phases.ENV_VAR: str(phase_log)}):  # the caller's environment comes back after
        run = Simulation(stream=False).start(config, run_dir)
        results_s = run.wait_for_results()
        outcome = run.finish()
    sites, rounds = read_metrics(RunDir(run_dir).metrics)
    server = read_done(RunDir(run_dir))
    round_seconds = [r.seconds for r in rounds]
    # A DP site no longer reports its training time to the server (docs/privacy.md): take it from the
    # sites' own phase marks, written on this machine, for every site round.
    site_train = [float(m.get("train_s", 0.0)) for m in phases.read(phase_log) if m["phase"] == "site_done"]
    require_every_sampled_site_trained(f"federation_overhead: {config.run.name}", [r.num_trained for r in rounds],
                                       config.federation.num_sites, config.federation.rounds)
    return {
        "wall_s": outcome.seconds,
        # SERVER_DONE seen: the results are complete and `fedssl simulate` starts evaluating (Flower and
        # Ray still shut down for a few seconds, overlapped); wall_s is until every Flower process is gone.
        "results_s": results_s,
        "server_s": server.seconds,
        "startup_before_server_s": outcome.seconds - server.seconds,
        "round_s": round_seconds,
        "first_round_extra_s": round_seconds[0] - (statistics.median(round_seconds[1:]) if len(round_seconds) > 1 else 0.0),
        "site_train_s_sum": sum(site_train),
        "site_rounds": len(sites),
        "trained": sum(1 for r in sites if r.status == "trained"),
        "noise_multipliers": _noise_multipliers(run_dir),
        "phases": phase_timeline(phase_log),
        "load_avg_after": list(os.getloadavg()),
        "run_dir": str(run_dir),
    }


# ------------------------------------------------------------------------ micro costs


def _subprocess_seconds(code: str, env_extra: dict[str, str] | None = None) -> float:
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_USAGE_STATS_ENABLED="0", **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in out.stdout.splitlines() if l.startswith("SECONDS ")]
    if not lines:
        raise RuntimeError(f"micro benchmark failed: {out.stderr[-500:]}")
    return float(lines[-1].split()[1])


def micro(config, with_subprocesses: bool) -> dict:
    from flwr.app import ArrayRecord

    from fedssl import experiment
    from fedssl.models import encoder_for

    out: dict[str, float] = {}
    experiment.central_data.cache_clear()
    started = time.perf_counter()
    experiment.site_partitions(config)
    out["data_load_and_partition_cold_s"] = time.perf_counter() - started
    started = time.perf_counter()
    experiment.site_partitions(config)
    out["data_load_and_partition_cached_s"] = time.perf_counter() - started
    state = encoder_for(config.model).state_dict()
    started = time.perf_counter()
    for _ in range(20):
        ArrayRecord(state).to_torch_state_dict()
    out["encoder_roundtrip_serialization_s"] = (time.perf_counter() - started) / 20
    if with_subprocesses:
        from flwr.cli.build import build_fab_from_disk

        from fedssl.run.app_stage import stage_app

        started = time.perf_counter()
        checkout_fab = build_fab_from_disk(PROJECT_ROOT)
        out["fab_build_from_checkout_s"] = time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="fedssl-stage-") as stage:
            started = time.perf_counter()
            staged_fab = build_fab_from_disk(stage_app(PROJECT_ROOT, Path(stage) / "app"))
            out["fab_stage_and_build_s"] = time.perf_counter() - started
        out["fab_staged_identical"] = float(staged_fab == checkout_fab)
        out["fresh_process_import_clientapp_module_s"] = _subprocess_seconds(
            "import time; t = time.perf_counter(); import clients.client_app; print('SECONDS', time.perf_counter() - t)"
        )
        out["fresh_process_import_serverapp_s"] = _subprocess_seconds(
            "import time; t = time.perf_counter(); import server.server_app; print('SECONDS', time.perf_counter() - t)"
        )
        out["fresh_process_import_clientapp_s"] = _subprocess_seconds(
            "import time; t = time.perf_counter(); import clients.client_app, fedssl.training.local; "
            "print('SECONDS', time.perf_counter() - t)"
        )
        out["ray_init_s"] = _subprocess_seconds(
            "import time, ray; t = time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR'); "
            "print('SECONDS', time.perf_counter() - t); ray.shutdown()"
        )
        out["calibration_one_site_s"] = _subprocess_seconds(
            "from fedssl.privacy.analysis import noise_for_budget; import time, warnings; warnings.simplefilter('ignore'); "
            f"t = time.perf_counter(); noise_for_budget({config.privacy.target_epsilon}, {config.privacy.delta}, 0.25, "
            f"{config.federation.rounds * config.training.local_steps}, 'rdp'); print('SECONDS', time.perf_counter() - t)"
        )
    return out


def summarise(replay_now: dict, runs: dict) -> dict:
    """Headline ratio: flower wall / the sites' own training seconds reported *in that run*.

    Both sides come from the same minutes of the same run, so load from other jobs on this
    shared machine inflates them together; comparisons with the in-process replay mix time
    windows and are kept only as secondary numbers.
    """
    summary: dict[str, float] = {"target_ratio": TARGET}
    for key, run in runs.items():
        summary[f"ratio_{key}"] = run["wall_s"] / run["site_train_s_sum"]
        summary[f"ratio_to_results_{key}"] = run["results_s"] / run["site_train_s_sum"]
        summary[f"ratio_rounds_only_{key}"] = sum(run["round_s"]) / run["site_train_s_sum"]
        summary[f"ratio_vs_replay_steps_{key}"] = run["wall_s"] / replay_now["steps_s"]
    summary["replay_train_round_over_steps_current"] = replay_now["train_round_s"] / replay_now["steps_s"]
    return summary


def rounds_sweep(run_lengths: list[int], sites: int, tmp: Path) -> dict:
    """One real run per length, in the order given and then reversed (paired against drifting load)."""
    runs: list[dict] = []
    for rounds in [*run_lengths, *reversed(run_lengths)]:
        config = _config(DEMO, sites, rounds, tmp / "runs", f"fedover-r{rounds}")
        run = flower_run(config, tmp)
        later = run["round_s"][1:] or run["round_s"]
        round_s = statistics.median(later)
        train_per_round = run["site_train_s_sum"] / rounds
        runs.append({
            "rounds": rounds,
            "wall_s": run["wall_s"],
            "results_s": run["results_s"],
            "site_train_s_sum": run["site_train_s_sum"],
            "ratio": run["wall_s"] / run["site_train_s_sum"],
            "ratio_to_results": run["results_s"] / run["site_train_s_sum"],
            "steady_round_s": round_s,
            "steady_round_ratio": round_s / train_per_round,
            "fixed_s": run["wall_s"] - rounds * round_s,
            "fixed_to_results_s": run["results_s"] - rounds * round_s,
            "load_avg_after": run["load_avg_after"],
        })
        print(f"federation_overhead: {rounds} rounds: wall {run['wall_s']:.1f}s (results at {run['results_s']:.1f}s), "
              f"training {run['site_train_s_sum']:.1f}s, ratio {runs[-1]['ratio']:.2f} ({runs[-1]['ratio_to_results']:.2f} to results), later rounds {round_s:.2f}s each ({runs[-1]['steady_round_ratio']:.2f} of "
              f"their training), fixed {runs[-1]['fixed_s']:.1f}s", flush=True)
    return {
        "runs": runs,
        "by_length": {
            str(n): {"ratio_median": statistics.median(r["ratio"] for r in runs if r["rounds"] == n),
                     "ratios": [r["ratio"] for r in runs if r["rounds"] == n],
                     "ratios_to_results": [r["ratio_to_results"] for r in runs if r["rounds"] == n]}
            for n in run_lengths
        },
        "model": sweep_model(runs),
        "model_to_results": sweep_model([{**r, "fixed_s": r["fixed_to_results_s"]} for r in runs]),
    }


def sweep_model(runs: list[dict]) -> dict:
    """wall(n) = fixed + n * round, training(n) = n * train: the run length from which wall <= TARGET * training."""
    fixed = statistics.median(r["fixed_s"] for r in runs)
    round_s = statistics.median(r["steady_round_s"] for r in runs)
    train_per_round = statistics.median(r["site_train_s_sum"] / r["rounds"] for r in runs)
    margin = TARGET * train_per_round - round_s
    return {
        "fixed_s": fixed,
        "steady_round_s": round_s,
        "train_per_round_s": train_per_round,
        "steady_round_ratio": round_s / train_per_round,
        "rounds_to_target": (fixed / margin) if margin > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-flower", action="store_true", help="in-process replay and micro costs only")
    parser.add_argument("--rounds-sweep", type=int, nargs="+", metavar="ROUNDS",
                        help="only the real runs, at these lengths (each twice); writes federation_overhead_rounds.json")
    args = parser.parse_args(argv)
    quiet_warnings()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    machine = machine_info()
    sites, rounds = (2, 2) if args.quick else (args.sites, args.rounds)
    if args.rounds_sweep:
        with tempfile.TemporaryDirectory(prefix="fedssl-bench-") as tmp_name:
            sweep = rounds_sweep(args.rounds_sweep, sites, Path(tmp_name))
        payload = {"machine": machine, "settings": {"config": str(DEMO.relative_to(PROJECT_ROOT)), "sites": sites,
                                                    "target_ratio": TARGET},
                   **sweep, "seconds": time.perf_counter() - started, "load_avg_end": list(os.getloadavg())}
        path = write_result("federation_overhead_rounds", payload, args.quick)
        print(f"federation_overhead: {json.dumps(sweep['model'])}; wrote {path}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fedssl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        config = _config(TINY if args.quick else DEMO, sites, rounds, tmp / "runs", "fedover")
        replay_now = replay(config, state_root=tmp / "replay-current")
        print(f"federation_overhead: replay: steps {replay_now['steps_s']:.1f}s, "
              f"train_round {replay_now['train_round_s']:.1f}s", flush=True)
        costs = micro(config, with_subprocesses=not args.quick)
        print(f"federation_overhead: micro {json.dumps({k: round(v, 4) for k, v in costs.items()})}", flush=True)
        runs = {}
        if not (args.quick or args.skip_flower):
            cfg = _config(DEMO, sites, rounds, tmp / "runs", "fedover-current")
            runs["current"] = run = flower_run(cfg, tmp)
            print(f"federation_overhead: flower: wall {run['wall_s']:.1f}s, train {run['site_train_s_sum']:.1f}s, "
                  f"startup {run['startup_before_server_s']:.1f}s, rounds {[round(s, 1) for s in run['round_s']]}, "
                  f"phases {json.dumps({k: None if v is None else round(v, 2) for k, v in run['phases'].get('durations_s', {}).items()})}",
                  flush=True)
    summary = summarise(replay_now, runs)
    payload = {
        "machine": machine,
        "settings": {"config": str((TINY if args.quick else DEMO).relative_to(PROJECT_ROOT)), "sites": sites, "rounds": rounds,
                     "local_steps": config.training.local_steps, "batch_size": config.training.batch_size,
                     "width": config.model.width, "privacy": config.privacy.enabled, "torch_threads_replay": 1},
        "summary": summary,
        "replay_current": replay_now,
        "micro": costs,
        "flower": runs,
        "seconds": time.perf_counter() - started,
        "load_avg_end": list(os.getloadavg()),
    }
    path = write_result("federation_overhead", payload, args.quick)
    print(f"federation_overhead: {json.dumps({k: round(v, 3) for k, v in summary.items()})}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
