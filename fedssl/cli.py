"""The `fedssl` command: thin over the library.

    fedssl simulate CONFIG [--set key=value ...] [--overwrite] | simulate --resume RUN_DIR
    fedssl check CONFIG [--set key=value ...] [--skip-evaluation]   (the preflight alone; no torch, no Flower)
    fedssl evaluate RUN_DIR
    fedssl report RUN_DIR
    fedssl audit PATH [--json] [--trusted-keys DIR] | audit --empirical CONFIG [--with-baseline]
    fedssl keys init-site NAME --out DIR      (ledger key + SuperNode node key)
    fedssl keys init-ca --out DIR | keys server-cert --ca DIR --host H --out DIR
    fedssl site preflight|start|status|seal --config site.yaml | site app-hash PATH
    fedssl server start --config server.yaml [--resume RUN_DIR]
    fedssl dashboard RUN_DIR|STATE_DIR [--host H --port P --expose --token T] | dashboard RUN_DIR --export FILE

Every user-facing failure is one line on stderr (one per problem, when a check finds several) and
exit code 2 (1 for a failed audit): no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedssl.audit.cli import add_arguments as add_audit_arguments
from fedssl.audit.cli import run as run_audit
from fedssl.errors import FedSSLError

EXIT_USAGE = 2


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedssl.config import load_config

    if args.resume is not None:
        _check_resume_arguments(args, args.config, args.set, args.overwrite)
        from fedssl.run.pipeline import resume_pipeline
        from fedssl.run.simulation import Simulation

        resume_pipeline(Path(args.resume), Simulation(stream=not args.quiet), evaluate=not args.skip_evaluation)
        return 0
    if args.config is None:
        raise FedSSLError("simulate: give an experiment CONFIG (e.g. configs/experiments/digits-demo.yaml), or --resume RUN_DIR")
    # The config first: a typo is reported before torch, Flower and Ray are imported (seconds).
    config = load_config(args.config, args.set)
    from fedssl.run.pipeline import run_pipeline
    from fedssl.run.simulation import Simulation

    run_pipeline(config, Simulation(stream=not args.quiet), overwrite=args.overwrite, evaluate=not args.skip_evaluation)
    return 0


def _check_resume_arguments(args: argparse.Namespace, config: str | None, overrides: list[str], overwrite: bool) -> None:
    """--resume continues a run with the config saved in its directory: nothing may change or replace it."""
    given = [name for name, value in (("CONFIG", config), ("--set", overrides), ("--overwrite", overwrite)) if value]
    if given:
        raise FedSSLError(f"--resume {args.resume}: drop {', '.join(given)}; a resumed run keeps the config.yaml saved in "
                          "its run directory (start a new run to change it)")


def _cmd_check(args: argparse.Namespace) -> int:
    from fedssl.preflight import check_file

    result = check_file(args.config, args.set, evaluate=not args.skip_evaluation)
    result.raise_for_problems()
    if args.load:
        _load_every_record(args.config, args.set)
    probe = result.probe
    data = f": data.source {probe.source} holds {probe.describe()}; {probe.describe_labels()}" if probe is not None else ""
    print(f"fedssl: {args.config} fits its data{data}")
    return 0


def _load_every_record(path: str, overrides: list[str]) -> None:
    """`fedssl check --load`: read the data as the sites will (every value and file, not just the headers the
    preflight probes), so a NaN, a ragged row or an unreadable image is one line now, not a failed round later."""
    from fedssl.config import load_config
    from fedssl.errors import DataError
    from fedssl.experiment import central_data_for

    try:
        central_data_for(load_config(path, overrides))
    except DataError as err:
        raise DataError(f"data.source: {err}") from None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedssl.run.pipeline import evaluate_run_dir, finish_run_dir, report

    finish_run_dir(Path(args.run_dir))
    evaluate_run_dir(Path(args.run_dir))
    report(Path(args.run_dir))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedssl.run.pipeline import report

    report(Path(args.run_dir))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from fedssl.deploy.pki import init_node_key, node_key_path
    from fedssl.privacy.keys import init_site_key, load_signing_key, public_key_fingerprint, public_key_path

    # Check both before writing either, so a re-run never leaves half a key set.
    if not args.overwrite and node_key_path(Path(args.out), args.name).exists():
        raise FedSSLError(f"{node_key_path(Path(args.out), args.name)}: a node key for site {args.name!r} already exists; keep it, or pass --overwrite")
    path = init_site_key(Path(args.out), args.name, overwrite=args.overwrite)
    fingerprint = public_key_fingerprint(load_signing_key(path).public_key())
    print(f"fedssl: site signing key written to {path} (mode 0600), its public key to {public_key_path(Path(args.out), args.name)} "
          f"(fingerprint {fingerprint}): register the .pub with your auditor (fedssl audit --trusted-keys DIR)")
    node = init_node_key(Path(args.out), args.name, overwrite=args.overwrite)
    print(f"fedssl: SuperNode auth key written to {node} (mode 0600); send {node}.pub to the coordinator to be registered")
    return 0


def _cmd_keys_ca(args: argparse.Namespace) -> int:
    from fedssl.deploy.pki import init_ca

    cert = init_ca(Path(args.out), overwrite=args.overwrite)
    print(f"fedssl: CA written to {cert} (give it to every site) and {cert.with_name('ca.key')} (mode 0600; keep it offline)")
    return 0


def _cmd_keys_server(args: argparse.Namespace) -> int:
    from fedssl.deploy.pki import server_cert

    cert = server_cert(Path(args.ca), args.host, Path(args.out), overwrite=args.overwrite)
    print(f"fedssl: SuperLink certificate for {', '.join(args.host)} written to {cert} and {cert.with_name('server.key')} (mode 0600)")
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    if args.site_command == "app-hash":
        from fedssl.deploy.site.pinning import app_hash

        print(app_hash(args.path))
        return 0
    if args.site_command == "start":
        from fedssl.deploy.site.supernode import start_site

        return start_site(args.config, echo=lambda m: print(m, flush=True))
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.preflight import failed_checks, format_checklist, preflight, preflight_passed
    from fedssl.deploy.site.status import status_text

    config = load_site_config(args.config)
    if args.site_command == "seal":
        from fedssl.privacy.highwater import seal

        mark = seal(config.state_path, config.ledger_key_path, config.highwater_path)
        print(f"fedssl: sealed {config.state_dir} at ledger seq {mark.seq}, epsilon {mark.epsilon:.3f}")
        return 0
    if args.site_command == "status":
        print(status_text(config, last=args.last))
        return 0
    checks = preflight(config, check_coordinator=not args.offline)
    print(f"fedssl: site {config.site.name} preflight")
    print(format_checklist(checks))
    for check in failed_checks(checks):  # the checklist is for reading; each blocking failure is one error line
        print(f"fedssl: error: {check.name}: {check.detail}", file=sys.stderr)
    return 0 if preflight_passed(checks) else EXIT_USAGE


def _cmd_server(args: argparse.Namespace) -> int:
    from fedssl.deploy.coordinator import start_server

    if args.resume is not None:
        _check_resume_arguments(args, None, args.set, args.overwrite)
    start_server(args.config, overrides=args.set, overwrite=args.overwrite, stream=not args.quiet, resume=args.resume)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from fedssl.dashboard.snapshot import build_snapshot, kind_of

    path = Path(args.path)
    kind_of(path)  # a wrong path is one line before anything starts
    if args.export:
        from fedssl.dashboard.page import export_html

        print(f"fedssl: dashboard report written to {export_html(build_snapshot(path), Path(args.export))}")
        return 0
    from fedssl.dashboard.app import check_bind, serve

    token = check_bind(args.host, expose=args.expose, token=args.token)
    serve(path, host=args.host, port=args.port, token=token, show_token=token is not None and args.token is None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedssl", description="Federated self-supervised learning under DP-SGD")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower Simulation Engine)")
    sim.add_argument("config", nargs="?", help="experiment YAML, e.g. configs/experiments/digits-demo.yaml")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last completed round, with its saved config")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    sim.add_argument("--skip-evaluation", action="store_true", help="pretrain only; no central evaluation")
    sim.add_argument("--quiet", action="store_true", help="do not stream round progress")
    sim.set_defaults(func=_cmd_simulate)

    check = sub.add_parser("check", help="check a config against its data before running it (every problem, one line each)")
    check.add_argument("config", help="experiment YAML, e.g. configs/experiments/digits-demo.yaml")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    check.add_argument("--skip-evaluation", action="store_true", help="as `simulate --skip-evaluation`: no labels needed")
    check.add_argument("--load", action="store_true",
                       help="also read every record as the sites will (values, every image): slower, finds NaNs and unreadable files")
    check.set_defaults(func=_cmd_check)

    ev = sub.add_parser("evaluate", help="(re)run central evaluation of a finished run and write its report (after a stock `flwr run .`, too)")
    ev.add_argument("run_dir")
    ev.set_defaults(func=_cmd_evaluate)

    rep = sub.add_parser("report", help="(re)write report.md of a run directory")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_cmd_report)

    audit = sub.add_parser("audit", help="verify ledgers and re-account epsilon independently (or --empirical: attack the mechanism)")
    add_audit_arguments(audit)
    audit.set_defaults(func=run_audit)

    _add_keys_parser(sub)
    _add_deployment_parsers(sub)
    _add_dashboard_parser(sub)
    return parser


def _add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    dash = sub.add_parser("dashboard", help="a read-only web page of a run's rounds, sites, privacy budgets and ledgers, live")
    dash.add_argument("path", metavar="RUN_DIR|STATE_DIR", help="a run directory (runs/NAME) or a site's state dir")
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else needs --expose)")
    dash.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    dash.add_argument("--expose", action="store_true", help="allow a non-loopback --host; every request then needs the token")
    dash.add_argument("--token", help="the token requests must carry (?token= or Authorization: Bearer); generated when exposed without one")
    dash.add_argument("--export", metavar="FILE", help="write one self-contained HTML report of the run now, and exit")
    dash.set_defaults(func=_cmd_dashboard)


def _add_keys_parser(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    site_key = keys_sub.add_parser("init-site", help="create a site's Ed25519 ledger-signing key and its SuperNode auth key (OpenSSH ECDSA)")
    site_key.add_argument("name")
    site_key.add_argument("--out", default="keys", help="directory for the key files (default: keys/)")
    site_key.add_argument("--overwrite", action="store_true")
    site_key.set_defaults(func=_cmd_keys)
    ca = keys_sub.add_parser("init-ca", help="create the federation's certificate authority (ca.crt + ca.key)")
    ca.add_argument("--out", default="certs", help="directory for ca.crt and ca.key (default: certs/)")
    ca.add_argument("--overwrite", action="store_true")
    ca.set_defaults(func=_cmd_keys_ca)
    srv = keys_sub.add_parser("server-cert", help="issue the SuperLink's TLS certificate from the CA")
    srv.add_argument("--ca", default="certs", help="directory holding ca.crt and ca.key (default: certs/)")
    srv.add_argument("--host", action="append", required=True, help="address sites connect to (IP or DNS name; repeatable)")
    srv.add_argument("--out", default="certs", help="directory for server.pem and server.key (default: certs/)")
    srv.add_argument("--overwrite", action="store_true")
    srv.set_defaults(func=_cmd_keys_server)


def _add_deployment_parsers(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="run this site in a real federation (SuperNode)")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    for name, text in (("preflight", "check data, keys, certificates, budget and the coordinator; change nothing"),
                       ("start", "preflight, then join the federation until stopped"),
                       ("status", "privacy budget spent/left and the last rounds, from this site's own ledger"),
                       ("seal", "once, for a state dir from before high-water marks: sign its mark as it is now")):
        cmd = site_sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="this site's site.yaml")
        if name == "status":
            cmd.add_argument("--last", type=int, default=5, help="how many ledger rounds to show")
        if name == "preflight":
            cmd.add_argument("--offline", action="store_true", help="skip the coordinator's TLS probe (check before it is up)")
        cmd.set_defaults(func=_cmd_site)
    app_hash = site_sub.add_parser("app-hash", help="print the pinning hash of an app (.fab or project directory)")
    app_hash.add_argument("path")
    app_hash.set_defaults(func=_cmd_site)

    server = sub.add_parser("server", help="coordinate a real federation (SuperLink)")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    start = server_sub.add_parser("start", help="start the SuperLink, register sites, run, report")
    start.add_argument("--config", required=True, help="the coordinator's server.yaml")
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an experiment value (repeatable)")
    start.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    start.add_argument("--quiet", action="store_true", help="do not stream round progress")
    start.add_argument("--resume", metavar="RUN_DIR", help="continue a run this coordinator left, from its last completed round")
    start.set_defaults(func=_cmd_server)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse printed --help (0) or its usage error (2)
        return 0 if exit_.code == 0 else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FedSSLError as err:
        for line in str(err).splitlines() or [""]:  # a check that found several problems: one line each
            print(f"fedssl: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedssl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
