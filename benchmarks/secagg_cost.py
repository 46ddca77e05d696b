"""Cost of secure aggregation: a SecAgg+ round vs a plain FedAvg round, 5 / 10 / 20 simulated sites.

Two measurements, both with Flower's real SecAgg+ code (SecAggPlusWorkflow + secaggplus_mod):

1. ``protocol`` — the aggregation alone. Flower's legacy DefaultWorkflow drives N in-process
   ClientApps through an in-memory Grid (each message deep-copied, as a transport would hand the
   ClientApp its own copy); the sites do no training and return fixed weights of the demo
   encoder's shapes (74,880 parameters). A round of ``DefaultWorkflow()`` (plain FedAvg: one
   round trip, weighted mean) is timed against ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)``
   (four round trips, key agreement, Shamir shares, quantization, masking, unmasking), interleaved.
   This isolates what SecAgg+ adds to a round, independent of training and of the simulator.
   Each round's aggregate is also compared with the exact example-weighted mean: the largest
   absolute difference is SecAgg+'s quantization error (weights ~N(0, 0.1), weights 101..100+N,
   max_weight 1000, clipping range 8, 2**22 levels).
2. ``federation`` — whole rounds of a real federation through `flwr run` (Simulation Engine,
   production ServerApp/ClientApp, DP-SGD at every site, the demo encoder), plain vs SecAgg+,
   alternating runs. A round's time is what the server logs in metrics.jsonl (configure →
   aggregate, all sites); round 1 (Ray start-up, noise calibration) is left out.

Variants: ``secagg`` = every sampled site a neighbour (num_shares 1.0, threshold 0.67);
``secagg_sparse`` (20 sites) = 5 shares, threshold 3, the sparse neighbourhood that is the "+"
of SecAgg+. The machine is shared and noisy: read the ratios, not the third digit.

    python benchmarks/secagg_cost.py                 # 5, 10, 20 sites
    python benchmarks/secagg_cost.py --quick         # smoke: 3 sites, tiny encoder, 1 repetition
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_POLICY_OVERRIDES, PROJECT_ROOT, machine_info, paired_ratio, quiet_warnings, require_every_sampled_site_trained,
    write_result,
)

NAME = "secagg_cost"
BASE = PROJECT_ROOT / "configs" / "experiments" / "digits-demo.yaml"
FULL = {"num_shares": 1.0, "reconstruction_threshold": 0.67}
SPARSE = {"num_shares": 5, "reconstruction_threshold": 3}


def variants(sites: int) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {"plain": None, "secagg": FULL}
    if sites >= 20:
        out["secagg_sparse"] = SPARSE
    return out


# ----------------------------------------------------------------------------- 1. protocol, in process

def _in_memory_grid(app, node_ids: list[int]):
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.serverapp import Grid

    contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in node_ids}

    class InMemoryGrid(Grid):
        run = SimpleNamespace(run_id=1)

        def set_run(self, run):  # noqa: D102
            pass

        def create_message(self, *args, **kwargs):  # noqa: D102
            raise NotImplementedError

        def get_node_ids(self):
            return list(node_ids)

        def get_nodes(self):
            return []

        def push_messages(self, messages):
            raise NotImplementedError

        def pull_messages(self, message_ids):
            raise NotImplementedError

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                delivered = copy.deepcopy(msg)  # the workflow shares one RecordDict among messages
                try:
                    replies.append(app(delivered, contexts[msg.metadata.dst_node_id]))
                except Exception as err:  # noqa: BLE001 - a failing site is a reply with an error
                    replies.append(Message(Error(code=0, reason=str(err)), reply_to=delivered))
            return replies

    return InMemoryGrid()


def protocol_round_seconds(sites: int, shares: dict | None, shapes: list[tuple[int, ...]], rounds: int,
                           errors: list[float] | None = None) -> list[float]:
    """Per-round seconds of one DefaultWorkflow run over ``sites`` in-process sites.

    ``errors`` collects each round's max |aggregate - exact example-weighted mean| (the
    quantization error for SecAgg+, ~1e-7 float rounding for plain FedAvg).
    """
    import numpy as np
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(0)
    weights = {nid: [rng.normal(0, 0.1, s).astype(np.float32) for s in shapes] for nid in range(1, sites + 1)}

    class Site(NumPyClient):
        def __init__(self, nid):
            self.nid = nid

        def fit(self, parameters, config):
            return weights[self.nid], 100 + self.nid, {}

    app = ClientApp(client_fn=lambda context: Site(context.node_id).to_client(), mods=[secaggplus_mod] if shares else [])
    times: list[float] = []

    class Timed(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            self._t0 = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            times.append(time.perf_counter() - self._t0)
            if errors is not None:
                counts = {nid: 100 + nid for nid in weights}
                exact = [sum(weights[nid][i].astype(np.float64) * n for nid, n in counts.items()) / sum(counts.values())
                         for i in range(len(shapes))]
                errors.append(max(float(np.max(np.abs(a - e))) for a, e in zip(parameters_to_ndarrays(out[0]), exact)))
            return out

    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites, min_available_clients=sites,
                     initial_parameters=ndarrays_to_parameters(weights[1]))
    fit = SecAggPlusWorkflow(**shares, max_weight=1000.0) if shares else None
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    DefaultWorkflow(fit_workflow=fit)(_in_memory_grid(app, list(range(1, sites + 1))),
                                      LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy))
    return times


def protocol_cost(site_counts: list[int], shapes: list[tuple[int, ...]], reps: int, rounds: int) -> dict:
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    results = {}
    for sites in site_counts:
        runs = {name: [] for name in variants(sites)}
        errors = {name: [] for name in variants(sites)}
        for _ in range(reps):  # interleaved: plain, secagg, (sparse), plain, ...
            for name, shares in variants(sites).items():
                runs[name].extend(protocol_round_seconds(sites, shares, shapes, rounds, errors[name]))
        plain = runs["plain"]
        entry = {name: {"median_round_ms": 1e3 * statistics.median(t), "rounds": len(t),
                        "max_abs_error_vs_exact_fedavg": max(errors[name])} for name, t in runs.items()}
        entry["ratio_vs_plain"] = {name: paired_ratio(t, plain) for name, t in runs.items() if name != "plain"}
        results[str(sites)] = entry
        print(f"protocol: {sites} sites: " + ", ".join(f"{k} {v['median_round_ms']:.1f} ms" for k, v in entry.items() if k != "ratio_vs_plain"), flush=True)
    return results


# ----------------------------------------------------------------------------- 2. whole federation rounds

def federation_run(sites: int, rounds: int, shares: dict | None, common: list[str], out_dir: Path, name: str) -> dict:
    from fedssl.config import load_config
    from fedssl.experiment import central_data_for
    from fedssl.layout import RunDir
    from fedssl.runlog import read_metrics
    from fedssl.run.pipeline import prepare_run_dir
    from fedssl.run.simulation import run_federation

    secagg = [] if shares is None else ["secure_aggregation.enabled=true", *(f"secure_aggregation.{k}={v}" for k, v in shares.items())]
    config = load_config(BASE, [f"federation.num_sites={sites}", f"federation.rounds={rounds}", "federation.min_sites=2",
                                f"run.output_dir={out_dir}", f"run.name={name}", *common, *secagg, *BENCH_POLICY_OVERRIDES])
    config.model.input_shape = list(central_data_for(config).train.input_shape)
    run_dir = prepare_run_dir(config, overwrite=True)
    run_federation(config, run_dir, stream=False)
    by_round = {r.round: r for r in read_metrics(RunDir(run_dir).metrics)[1]}
    require_every_sampled_site_trained(f"secagg_cost: {name}", [by_round[r].num_trained for r in sorted(by_round)], sites, rounds)
    return {"round1_seconds": by_round[1].seconds, "round_seconds": [by_round[r].seconds for r in sorted(by_round) if r > 1]}


def federation_cost(site_counts: list[int], rounds: int, reps: int, common: list[str]) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedssl-secagg-bench-") as tmp:
        for sites in site_counts:
            runs: dict[str, list[float]] = {name: [] for name in variants(sites)}
            for rep in range(reps):
                for name, shares in variants(sites).items():
                    print(f"federation: {sites} sites, {name}, repetition {rep + 1} ...", flush=True)
                    runs[name].extend(federation_run(sites, rounds, shares, common, Path(tmp), f"{name}-{sites}-{rep}")["round_seconds"])
            plain = statistics.median(runs["plain"])
            entry = {name: {"median_round_seconds": statistics.median(t), "round_seconds": t} for name, t in runs.items()}
            entry["ratio_vs_plain"] = {name: statistics.median(t) / plain for name, t in runs.items() if name != "plain"}
            entry["extra_seconds_per_round"] = {name: statistics.median(t) - plain for name, t in runs.items() if name != "plain"}
            results[str(sites)] = entry
            print(f"federation: {sites} sites: " + ", ".join(f"{k} {v['median_round_seconds']:.2f} s" for k, v in entry.items() if "seconds" in str(v)), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 sites, tiny encoder, 1 repetition")
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--skip-federation", action="store_true", help="only the in-process protocol measurement")
    args = parser.parse_args()
    quiet_warnings()
    from fedssl.models import build_encoder

    width, depth = (8, 2) if args.quick else (64, 3)
    sites = [3] if args.quick else args.sites
    shapes = [tuple(t.shape) for t in build_encoder("cnn", (1, 8, 8), width=width, depth=depth).state_dict().values()]
    protocol = protocol_cost(sites, shapes, reps=1 if args.quick else 3, rounds=2 if args.quick else 3)
    federation = None
    common = [f"model.width={width}", f"model.depth={depth}", "training.local_steps=5", "training.batch_size=16", "evaluation.enabled=false"]
    if not args.skip_federation:
        # `flwr run` starts flower-superlink from PATH: use this interpreter's environment.
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        federation = federation_cost(sites, rounds=3 if args.quick else 4, reps=1 if args.quick else 2, common=common)
    path = write_result(NAME, {
        "machine": machine_info(),
        "settings": {
            "encoder_parameters": sum(int(__import__("math").prod(s)) for s in shapes),
            "protocol": "in-process DefaultWorkflow, N NumPyClient sites returning fixed weights (no training), "
                        "in-memory Grid with per-message deep copy; per-round time configure_fit -> aggregate_fit",
            "federation": {"base_config": str(BASE.relative_to(PROJECT_ROOT)), "overrides": common,
                           "measured": "median server-side round time, rounds 2..R, pooled over repetitions (metrics.jsonl)"},
            "secagg": FULL, "secagg_sparse": SPARSE, "max_weight": 1000.0,
        },
        "protocol": protocol,
        "federation": federation,
    }, quick=args.quick)
    for n in map(str, sites):
        line = [f"{n} sites:"]
        for name, ratio in protocol[n]["ratio_vs_plain"].items():
            line.append(f"aggregation {name} x{ratio['median']:.1f} ({protocol[n][name]['median_round_ms']:.0f} vs {protocol[n]['plain']['median_round_ms']:.1f} ms)")
        if federation:
            for name, ratio in federation[n]["ratio_vs_plain"].items():
                line.append(f"round {name} x{ratio:.2f} (+{federation[n]['extra_seconds_per_round'][name]:.2f} s)")
        print("; ".join(line))
    print(f"secagg_cost: written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
