"""Run the benchmarks one after another and write the markdown summary with plots.

    python benchmarks/run_all.py --quick    # what `make bench` runs: every script's smoke mode
    python benchmarks/run_all.py            # the full set (~45 min on 2 cores; see README)
    python benchmarks/run_all.py --summary-only   # re-render results/SUMMARY.md and plots

Each benchmark runs in its own process (a crash in one does not hide the others; its exit
code is reported). Full results land in benchmarks/results/*.json, quick ones in
benchmarks/results/quick/. benchmarks/secagg_cost.py and benchmarks/deployment_overhead.py
are run too when present (they are maintained separately).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, PROJECT_ROOT, results_dir  # noqa: E402

# Order: cheap first, so a quick run fails fast.
SCRIPTS = ["communication", "dp_overhead", "federation_overhead", "scale", "learning", "data_scale", "secagg_cost",
           "deployment_overhead"]
FULL_ARGS = {"learning": ["--part", "table", "--part", "payoff", "--part", "shift", "--part", "mnist",
                          "--part", "mnist_tune", "--part", "mnist_payoff"]}


def run_script(name: str, quick: bool, timeout: float) -> dict:
    script = BENCH_DIR / f"{name}.py"
    if not script.exists():
        return {"name": name, "status": "absent"}
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else FULL_ARGS.get(name, []))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "seconds": time.perf_counter() - started}
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    return {
        "name": name,
        "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
        "seconds": time.perf_counter() - started,
        "tail": lines[-3:],
        "stderr_tail": proc.stderr.strip().splitlines()[-5:] if proc.returncode else [],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode of every script (crash check; numbers meaningless)")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS)
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=None, help="per script, seconds")
    args = parser.parse_args(argv)
    failures = 0
    if not args.summary_only:
        timeout = args.timeout or (300 if args.quick else 3600)
        for name in args.only or SCRIPTS:
            outcome = run_script(name, args.quick, timeout)
            if outcome["status"] == "absent":
                print(f"run_all: {name}: not present, skipped")
                continue
            print(f"run_all: {name}: {outcome['status']} in {outcome.get('seconds', 0):.0f}s")
            for line in outcome.get("tail", []):
                print(f"    {line}")
            for line in outcome.get("stderr_tail", []):
                print(f"    ! {line}")
            failures += outcome["status"] != "ok"
    from summarize import write_summary

    path = write_summary(results_dir(args.quick))
    print(f"run_all: summary written to {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
