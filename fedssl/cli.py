"""The `fedssl` command: thin over the library.

    fedssl simulate CONFIG [--set key=value ...] [--overwrite]
    fedssl evaluate RUN_DIR
    fedssl report RUN_DIR
    fedssl audit PATH [--json] [--trusted-keys DIR]
    fedssl keys init-site NAME --out DIR

Every user-facing failure is one line on stderr and exit code 2 (1 for a failed audit):
no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedssl.errors import FedSSLError

EXIT_USAGE = 2


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedssl.config import load_config
    from fedssl.experiment import central_data_for
    from fedssl.simulation import prepare_run_dir, run_federation, write_summary

    started = time.perf_counter()
    config = load_config(args.config, args.set)
    if not config.model.input_shape:
        config.model.input_shape = list(central_data_for(config).train.input_shape)
    run_dir = prepare_run_dir(config, overwrite=args.overwrite)
    p = config.privacy
    privacy = f"DP eps<={p.target_epsilon:g}, delta={p.delta:g} per site" if p.enabled else "NO differential privacy"
    print(
        f"fedssl: run {config.run.name}: {config.federation.num_sites} sites x {config.federation.rounds} rounds, "
        f"pretext {config.pretext.name}, {privacy} -> {run_dir}",
        flush=True,
    )
    outcome = run_federation(config, run_dir, stream=not args.quiet)
    write_summary(run_dir, run_name=config.run.name, federation_seconds=outcome.seconds)
    if config.evaluation.enabled and not args.skip_evaluation:
        _evaluate(run_dir)
    write_summary(run_dir, wall_seconds=time.perf_counter() - started)
    return _report(run_dir)


def _evaluate(run_dir: Path) -> None:
    from fedssl.evaluation.central import evaluate_run

    print("fedssl: central evaluation on consented labels ...", flush=True)
    evaluate_run(run_dir, progress=lambda msg: print(f"fedssl: {msg}", flush=True))


def _report(run_dir: Path) -> int:
    from fedssl.reporting import terminal_summary, write_report

    report = write_report(run_dir)
    print(terminal_summary(run_dir))
    print(f"fedssl: report written to {report}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _evaluate(Path(args.run_dir))
    return _report(Path(args.run_dir))


def _cmd_report(args: argparse.Namespace) -> int:
    return _report(Path(args.run_dir))


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedssl.privacy.audit import audit_main

    return audit_main(args.audit_args)


def _cmd_keys(args: argparse.Namespace) -> int:
    from fedssl.privacy.keys import init_site_key

    path = init_site_key(Path(args.out), args.name, overwrite=args.overwrite)
    print(f"fedssl: site signing key written to {path} (public key beside it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedssl", description="Federated self-supervised learning under DP-SGD")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower Simulation Engine)")
    sim.add_argument("config", help="experiment YAML, e.g. configs/experiments/digits-demo.yaml")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    sim.add_argument("--skip-evaluation", action="store_true", help="pretrain only; no central evaluation")
    sim.add_argument("--quiet", action="store_true", help="do not stream round progress")
    sim.set_defaults(func=_cmd_simulate)

    ev = sub.add_parser("evaluate", help="(re)run central evaluation of a finished run")
    ev.add_argument("run_dir")
    ev.set_defaults(func=_cmd_evaluate)

    rep = sub.add_parser("report", help="(re)write report.md of a run directory")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_cmd_report)

    audit = sub.add_parser("audit", help="verify ledgers and re-account epsilon independently", add_help=False)
    audit.add_argument("audit_args", nargs=argparse.REMAINDER)
    audit.set_defaults(func=_cmd_audit)

    keys = sub.add_parser("keys", help="key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    site_key = keys_sub.add_parser("init-site", help="create a site's Ed25519 ledger-signing key")
    site_key.add_argument("name")
    site_key.add_argument("--out", default="keys", help="directory for the key files (default: keys/)")
    site_key.add_argument("--overwrite", action="store_true")
    site_key.set_defaults(func=_cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FedSSLError as err:
        print(f"fedssl: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedssl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
