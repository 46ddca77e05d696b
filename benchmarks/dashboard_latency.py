"""The dashboard's refresh latency on a live run, and the screenshot in docs/img/dashboard.png.

    python benchmarks/dashboard_latency.py [--rounds 6] [--screenshot docs/img/dashboard.png]

Starts a real `fedssl simulate` of digits-tiny with more rounds, serves its run directory with the real
`fedssl dashboard`, and opens the page in Debian's chromium (Playwright). For every round the server
lands, the time from the round record appearing in metrics.jsonl (polled every 20 ms) to the page
showing it (its rounds counter, polled every 20 ms) is the refresh latency. When the run has finished
and been evaluated, the page is screenshotted. Writes results/dashboard_latency.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROJECT_ROOT, write_result  # noqa: E402

from fedssl.layout import RunDir  # noqa: E402
from fedssl.runlog import read_metrics  # noqa: E402

FEDSSL = str(Path(sys.executable).parent / "fedssl")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
POLL = 0.02


def _rounds_on_disk(layout: RunDir) -> int:
    try:
        return len(read_metrics(layout.metrics)[1])
    except (ValueError, OSError):  # not there yet, or a line half-written
        return -1


def _rounds_on_page(page) -> tuple[int, bool]:
    """Rounds the page shows, and whether its snapshot is the audited one (ledgers verified for them)."""
    done, audited = page.evaluate("() => [document.getElementById('rounds-done').dataset.done, document.body.dataset.audited]")
    return (int(done) if done is not None else -1), audited == "true"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _watch(sim: subprocess.Popen, layout: RunDir, page) -> list[dict[str, float]]:
    landed: dict[int, float] = {}
    shown: dict[int, float] = {}
    verified: dict[int, float] = {}
    while sim.poll() is None or len(verified) < len(landed):
        now, disk = time.monotonic(), _rounds_on_disk(layout)
        for n in range(1, disk + 1):
            landed.setdefault(n, now)
        on_page, audited = _rounds_on_page(page)
        for n in range(1, on_page + 1):
            shown.setdefault(n, time.monotonic())
            if audited:
                verified.setdefault(n, time.monotonic())
        if sim.poll() is not None and time.monotonic() - max(landed.values(), default=now) > 60:
            break
        time.sleep(POLL)
    return [{"round": n, "latency_s": round(shown[n] - landed[n], 3),
             "verified_latency_s": round(verified[n] - landed[n], 3) if n in verified else None}
            for n in sorted(landed) if n in shown]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--screenshot", type=Path, default=PROJECT_ROOT / "docs" / "img" / "dashboard.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    output = Path(tempfile.mkdtemp(prefix="dashboard-live-"))
    layout = RunDir(output / "digits-tiny")
    sim = subprocess.Popen([FEDSSL, "simulate", str(PROJECT_ROOT / "configs/experiments/digits-tiny.yaml"), "--quiet",
                            "--set", f"run.output_dir={output}", "--set", f"federation.rounds={args.rounds}", "--overwrite"],
                           cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not layout.config.is_file():
        time.sleep(0.1)
    port = _free_port()
    dash = subprocess.Popen([FEDSSL, "dashboard", str(layout.path), "--port", str(port)], stdout=subprocess.PIPE, text=True)
    dash.stdout.readline()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            for _ in range(100):
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except Exception:  # the server is still starting
                    time.sleep(0.2)
            page.wait_for_function("document.getElementById('rounds-done').dataset.done !== undefined", timeout=60_000)
            latencies = _watch(sim, layout, page)
            page.wait_for_function("document.getElementById('state').textContent === 'finished'", timeout=120_000)
            page.wait_for_function("!document.getElementById('evaluation-section').hidden", timeout=300_000)
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.screenshot), full_page=True)
            browser.close()
    finally:
        dash.terminate()
        sim.wait()
    values = [r["latency_s"] for r in latencies]
    checked = [r["verified_latency_s"] for r in latencies if r["verified_latency_s"] is not None]
    result = {"rounds": args.rounds, "per_round": latencies, "median_s": statistics.median(values), "max_s": max(values),
              "verified_median_s": statistics.median(checked) if checked else None, "poll_s": 0.5,
              "note": "latency_s: from the round record appearing in metrics.jsonl to the page showing it; "
                      "verified_latency_s: to the page showing it with every ledger re-verified by the audit"}
    out = write_result("dashboard_latency", result, quick=False)
    print(json.dumps(result, indent=1))
    print(f"written {out} and {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
