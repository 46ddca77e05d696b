"""`fedssl audit` on the command line (the ledger audit; ``--empirical`` goes on to fedssl.audit.empirical).

Exit codes of :func:`audit_main`: 0 clean, 1 any tamper / mismatch / over-budget, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedssl.audit.ledgers import DEFAULT_TOLERANCE, audit_path
from fedssl.audit.render import format_terminal, to_json, write_reports
from fedssl.errors import ConfigError
from fedssl.layout import AUDIT_PLOT, AUDIT_REPORT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedssl audit",
        description="Verify privacy ledgers and re-account epsilon independently. Exit 0 clean, 1 on any "
        "tamper/mismatch/over-budget, 2 on usage errors.",
        epilog="fedssl audit --empirical CONFIG [--with-baseline]: test the mechanism itself with a canary "
        "membership attack that gives a lower bound on epsilon (see fedssl audit --empirical --help).",
    )
    parser.add_argument("path", type=Path, help="a site state dir (has ledger.jsonl) or a run dir (has sites/*/ledger.jsonl)")
    parser.add_argument("--trusted-keys", type=Path, metavar="DIR", help="registered public keys: <site>.ed25519.pub, server.ed25519.pub")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="relative tolerance for claimed vs recomputed ε (default 0.05)")
    parser.add_argument("--server-ledger", type=Path, metavar="FILE", help="the server's server_ledger.jsonl, to check a single site against")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    parser.add_argument("--out", type=Path, metavar="DIR", help=f"where to write {AUDIT_REPORT} and {AUDIT_PLOT} (default: the audited dir)")
    return parser


def audit_main(argv: Sequence[str]) -> int:
    if "--empirical" in argv:
        from fedssl.audit.empirical import empirical_main

        return empirical_main([a for a in argv if a != "--empirical"])
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # argparse already printed its one-line message (or --help)
        return 0 if exit_.code == 0 else 2
    try:
        report = audit_path(
            args.path, trusted_keys_dir=args.trusted_keys, tolerance=args.tolerance, server_ledger=args.server_ledger
        )
    except ConfigError as err:
        print(f"fedssl audit: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable ledger or key file: name it, no traceback
        print(f"fedssl audit: cannot read {err.filename or args.path}: {err.strerror or err}", file=sys.stderr)
        return 2
    out_dir = args.out or (args.path.parent if args.path.is_file() else args.path)
    try:
        files = write_reports(report, out_dir)
    except OSError as err:
        print(f"fedssl audit: could not write the report to {out_dir}: {err}", file=sys.stderr)
        files = []
    if args.json:
        print(json.dumps(to_json(report, files), indent=1))
    else:
        print(format_terminal(report))
        if files:
            print("report: " + ", ".join(str(p) for p in files))
    return 0 if report.ok else 1
