"""`fedssl audit` on the command line: one argument parser for both audits, and the code that runs it.

    fedssl audit PATH [--trusted-keys DIR] [--tolerance T] [--server-ledger FILE] [--json] [--out DIR]
    fedssl audit --empirical CONFIG [--set KEY=VALUE ...] [--canaries N] [--attack gradient|loss]
                 [--site N] [--max-site-samples N] [--with-baseline] [--json]

The first verifies privacy ledgers and re-accounts ε (fedssl.audit.ledgers, shown by
fedssl.audit.render); the second trains one site with canaries and attacks it for a lower
bound on ε (fedssl.audit.empirical). An option of the other mode is a one-line usage error.

Exit codes of :func:`run`: 0 clean; 1 a failed ledger audit (tamper, mismatch, over budget), an
empirical bound above the claimed ε, or a vacuous no-DP baseline; 2 usage.

`fedssl` builds this parser for every command, so nothing of the audits is imported until one runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedssl.errors import ConfigError, FedSSLError
from fedssl.layout import AUDIT_PLOT, AUDIT_REPORT
from fedssl.progress import ProgressDisplay

EXIT_USAGE = 2

USAGE = """fedssl audit PATH [--trusted-keys DIR] [--tolerance T] [--server-ledger FILE] [--json] [--out DIR]
       fedssl audit --empirical CONFIG [--set KEY=VALUE ...] [--canaries N] [--attack gradient|loss]
                    [--site N] [--max-site-samples N] [--with-baseline] [--json]"""
DESCRIPTION = (
    "Verify privacy ledgers and re-account epsilon independently (PATH), or, with --empirical, test the "
    "mechanism itself with a canary membership attack that gives a lower bound on epsilon (CONFIG). "
    "Exit 0 clean, 1 on any tamper/mismatch/over-budget (or an empirical bound above the claim, or a "
    "vacuous --with-baseline), 2 on usage errors."
)

# Each mode's own options, flag -> add_argument keywords. They default to absent (SUPPRESS), so an
# option given in the other mode can be told from a default, and the audits' own defaults apply.
LEDGER_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "--trusted-keys": {"dest": "trusted_keys_dir", "type": Path, "metavar": "DIR",
                       "help": "registered public keys: <site>.ed25519.pub, server.ed25519.pub"},
    "--tolerance": {"type": float, "metavar": "T", "help": "relative tolerance for claimed vs recomputed ε (default 0.05)"},
    "--server-ledger": {"type": Path, "metavar": "FILE", "help": "the server's server_ledger.jsonl, to check a single site against"},
    "--out": {"type": Path, "metavar": "DIR", "help": f"where to write {AUDIT_REPORT} and {AUDIT_PLOT} (default: the audited dir)"},
}
EMPIRICAL_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "--set": {"action": "append", "metavar": "KEY=VALUE", "help": "override a config value (repeatable)"},
    "--canaries": {"dest": "num_canaries", "type": int, "metavar": "N", "help": "number of canaries (half inserted); default 200"},
    "--attack": {"metavar": "gradient|loss", "help": "gradient: gradient canaries read from every round's update "
                 "(white-box, default); loss: final model only"},
    "--site": {"dest": "site_id", "type": int, "metavar": "N", "help": "which simulated site gets the canaries (default 0)"},
    "--max-site-samples": {"type": int, "metavar": "N", "help": "keep at most this many real samples at the audited site"},
    "--with-baseline": {"action": "store_true", "help": "also run with DP off to show the attack is not vacuous"},
}
LEDGER_MODE = "the ledger audit (fedssl audit PATH)"
EMPIRICAL_MODE = "the empirical audit (fedssl audit --empirical CONFIG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` (``fedssl audit``'s subparser) the audit's: both modes' arguments, usage and help."""
    parser.usage = USAGE
    parser.description = DESCRIPTION
    parser.add_argument("path", nargs="?", metavar="PATH|CONFIG",
                        help="a site state dir (has ledger.jsonl) or a run dir (has sites/*/ledger.jsonl); "
                        "with --empirical, the experiment YAML whose DP settings are audited")
    parser.add_argument("--empirical", action="store_true",
                        help="insert canaries into one site, run its real training for every planned round and "
                        "attack it: a lower bound on epsilon that must stay below the claim")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    for title, options in ((LEDGER_MODE, LEDGER_OPTIONS), (EMPIRICAL_MODE, EMPIRICAL_OPTIONS)):
        group = parser.add_argument_group(title)
        for flag, keywords in options.items():
            group.add_argument(flag, default=argparse.SUPPRESS, **keywords)


def _dest(flag: str, options: Mapping[str, Mapping[str, Any]]) -> str:
    return options[flag].get("dest", flag.lstrip("-").replace("-", "_"))


def _given(args: argparse.Namespace, options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The options of one mode that ``args`` holds, flag -> value."""
    return {flag: getattr(args, _dest(flag, options)) for flag in options if hasattr(args, _dest(flag, options))}


def _usage_error(message: str) -> int:
    print(f"fedssl audit: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    """Run the audit that ``args`` (parsed by a parser :func:`add_arguments` built) asks for; the exit code."""
    own, other, other_mode = (
        (EMPIRICAL_OPTIONS, LEDGER_OPTIONS, LEDGER_MODE) if args.empirical else (LEDGER_OPTIONS, EMPIRICAL_OPTIONS, EMPIRICAL_MODE)
    )
    wrong = list(_given(args, other))
    if wrong:
        mode = "--empirical" if args.empirical else "a ledger audit"
        return _usage_error(f"{', '.join(wrong)}: an option of {other_mode}, not of {mode}")
    if args.path is None:
        what = "an experiment CONFIG to audit empirically" if args.empirical else "a site state dir or a run dir to audit (or --empirical CONFIG)"
        return _usage_error(f"give {what}")
    options = {_dest(flag, own): value for flag, value in _given(args, own).items()}
    if args.empirical:
        return _run_empirical(args.path, options, as_json=args.json)
    return _run_ledgers(Path(args.path), options, as_json=args.json)


def _run_ledgers(path: Path, options: dict[str, Any], *, as_json: bool) -> int:
    from fedssl.audit.ledgers import audit_path
    from fedssl.audit.render import format_terminal, to_json, write_reports

    out = options.pop("out", None)
    try:
        report = audit_path(path, **options)
    except ConfigError as err:
        return _usage_error(str(err))
    except OSError as err:  # unreadable ledger or key file: name it, no traceback
        return _usage_error(f"cannot read {err.filename or path}: {err.strerror or err}")
    out_dir = out or (path.parent if path.is_file() else path)
    try:
        files = write_reports(report, out_dir)
    except OSError as err:
        print(f"fedssl audit: could not write the report to {out_dir}: {err}", file=sys.stderr)
        files = []
    if as_json:
        print(json.dumps(to_json(report, files), indent=1))
    else:
        print(format_terminal(report))
        if files:
            print("report: " + ", ".join(str(p) for p in files))
    return 0 if report.ok else 1


def _run_empirical(config_path: str, options: dict[str, Any], *, as_json: bool) -> int:
    """Exit 1 if a lower bound exceeds the claimed ε, or (with --with-baseline) if the no-DP bound is vacuous."""
    from fedssl.audit.empirical import VACUOUS_BOUND, run_empirical_audit
    from fedssl.experiment import load_experiment

    overrides, baseline = options.pop("set", []), options.pop("with_baseline", False)
    try:
        variants = [load_experiment(config_path, overrides)]
        if baseline:
            variants.append(load_experiment(config_path, [*overrides, "privacy.enabled=false"]))
        results = [run_empirical_audit(c, **options, progress=ProgressDisplay(lambda m: print(m, file=sys.stderr))) for c in variants]
    except FedSSLError as err:
        return _usage_error(str(err))
    vacuous = baseline and results[-1].epsilon_lower_bound <= VACUOUS_BOUND
    failed = any(r.claimed_epsilon is not None and r.epsilon_lower_bound > r.claimed_epsilon for r in results)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        for r in results:
            print(("DP on:  " if r.dp_enabled else "DP off: ") + r.summary())
        if vacuous:
            print(f"the no-DP baseline found no leak (bound <= {VACUOUS_BOUND}): the audit is vacuous at this size; "
                  "use more canaries or rounds")
    return 1 if failed or vacuous else 0
