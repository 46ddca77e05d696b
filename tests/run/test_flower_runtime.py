"""The Flower process helpers both launchers and the site agent share, without Flower processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fedssl.errors import FedSSLError
from fedssl.run.flower_runtime import FAILURE_REASON_CHARS, FlwrRun, failure_reason, progress_message


def test_failure_reason_is_the_last_error_line_without_colours():
    text = (
        "\x1b[92mINFO\x1b[0m :      Starting run\n"
        "\x1b[91mERROR\x1b[0m :     first problem\n"
        "  \n"
        "ValueError: config.yaml not found\n"
        "\x1b[92mINFO\x1b[0m :      Run finished\n"
    )
    assert failure_reason(text) == "ValueError: config.yaml not found"
    assert failure_reason("x\nregistration Failed: key unknown\nbye\n") == "registration Failed: key unknown"
    assert failure_reason("\x1b[91mERROR\x1b[0m : refused\n") == "ERROR : refused"


def test_failure_reason_falls_back_to_the_last_line_and_is_bounded():
    assert failure_reason("starting\n\x1b[1mstopped\x1b[0m\n\n") == "stopped"
    assert failure_reason("") == "no output"
    assert failure_reason(" \n\t\n") == "no output"
    long = "error " + "x" * 1000
    assert failure_reason(long) == long[-FAILURE_REASON_CHARS:] and FAILURE_REASON_CHARS == 400


def test_progress_message_keeps_our_lines_and_errors_only():
    assert progress_message("INFO :      fedssl: round 1/2 done\n") == "fedssl: round 1/2 done"
    assert progress_message("(ClientAppActor pid=1) fedssl: round 1/2 done\n") == "fedssl: round 1/2 done"
    assert progress_message("ERROR :     boom\n") == "ERROR :     boom"
    assert progress_message("INFO :      Starting Flower Simulation\n") is None


# ---------------------------------------------------------------------------- FlwrRun with a stand-in for `flwr run`


def _fake_flwr(tmp_path, body: str):
    """A FlwrRun whose command is a short Python script standing in for `flwr run --stream`."""

    class Failed(FedSSLError):
        pass

    said, cleaned = [], []
    run = FlwrRun([sys.executable, "-c", body], run_dir=tmp_path, env=dict(os.environ), cwd=tmp_path, stream=True,
                  echo=said.append, on_exit=lambda: cleaned.append(True), error=Failed)
    return run, said, cleaned, Failed


def test_flwr_run_results_at_server_done_and_a_late_nonzero_exit_keeps_them(tmp_path):
    body = ("import sys, time, pathlib; print('INFO : fedssl: round 1/1 done'); print('x fedssl: round 1/1 done'); "
            "sys.stdout.flush(); pathlib.Path('server_done.json').write_text('{}'); time.sleep(0.3); sys.exit(3)")
    run, said, cleaned, _ = _fake_flwr(tmp_path, body)
    assert run.wait_for_results() > 0
    outcome = run.finish()
    assert outcome.flwr_exit_seconds > 0 and run.finish() is outcome and cleaned == [True]
    assert said[0] == "fedssl: round 1/1 done" and len(said) == 2  # shown once; then the warning
    assert "exited with code 3 after the run had finished" in said[1]
    assert "round 1/1 done" in (tmp_path / "flwr.log").read_text()


def test_flwr_run_without_server_done_is_an_error_naming_the_failing_line(tmp_path):
    run, _, cleaned, failed = _fake_flwr(tmp_path, "print('\\x1b[91mERROR\\x1b[0m : the ServerApp crashed'); print('bye')")
    with pytest.raises(failed, match=r"federated run failed \(flwr exit 0\): ERROR : the ServerApp crashed; full log"):
        run.wait_for_results()
    assert cleaned == [True]


def test_flwr_run_times_out_and_can_be_aborted(tmp_path):
    run, _, cleaned, failed = _fake_flwr(tmp_path, "import time; time.sleep(60)")
    with pytest.raises(failed, match="did not finish within 0 s"):
        run.wait_for_results(timeout=0.2)
    assert cleaned == [True] and run._proc.poll() is not None
    run.abort()  # idempotent
    assert cleaned == [True]


def test_the_pipeline_aborts_a_run_that_fails_before_its_results(tmp_path):
    """Interrupted (or failed) before the results: the federation is killed, never waited for."""
    from fedssl.config import load_config
    from fedssl.run.pipeline import run_pipeline

    calls = []

    class Federation:
        def wait_for_results(self, timeout=None):
            calls.append(("wait", timeout))
            raise KeyboardInterrupt

        def finish(self):
            calls.append("finish")

        def abort(self):
            calls.append("abort")

    class Launcher:
        evaluation_optional, results_timeout, simulates_sites = False, 7.0, True

        def input_shape(self, config):
            return [1, 8, 8]

        def describe(self, config):
            return "fake"

        def summary_fields(self):
            return {}

        def start(self, config, run_dir):
            calls.append("start")
            return Federation()

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "digits-tiny.yaml", [f"run.output_dir={tmp_path}", "warm_start.source=none"])
    said = []
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, Launcher(), echo=said.append)
    assert calls == ["start", ("wait", 7.0), "abort"]
    assert config.model.input_shape == [1, 8, 8] and (tmp_path / config.run.name / "config.yaml").is_file()
    assert said[-1].startswith("fedssl: run digits-tiny: fake -> ")


def test_max_parallel_sites_sizes_flowers_actor_pool_through_rays_cpu_count():
    """Flower makes Ray's CPUs / client_cpus actors: max_parallel_sites sets Ray's CPUs; 0 leaves Ray to count."""
    from fedssl.config import load_config
    from fedssl.run.simulation import federation_config

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "digits-tiny.yaml")
    assert federation_config(load_config(tiny)).split() == [
        "num-supernodes=2", "client-resources-num-cpus=1", "client-resources-num-gpus=0", "init-args-num-cpus=1"]
    two = load_config(tiny, ["simulation.max_parallel_sites=2", "simulation.client_cpus=1.5"])
    assert "init-args-num-cpus=3" in federation_config(two).split()
    machine = load_config(tiny, ["simulation.max_parallel_sites=0"])
    assert not any(arg.startswith("init-args") for arg in federation_config(machine).split())
