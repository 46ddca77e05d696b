"""Real deployment, federation 3: SecAgg+ and a warm start over TLS with node authentication."""

from __future__ import annotations

import pytest

from deploy_processes import (  # noqa: F401  (procs is a fixture)
    FEDSSL, procs, site_round_records, stop_agent, text, wait_until,
)

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- federation 3


def test_secure_aggregation_and_warm_start_over_tls(tmp_path_factory, procs):
    # Deployment with SecAgg+ (three sites, each holding a share of the others' secrets) and a
    # synthetic warm start the coordinator builds before any site connects.
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.layout import WARM_START_FILE

    root = tmp_path_factory.mktemp("fed3")
    fed = make_local_federation(root, ["site-e", "site-f", "site-g"], rounds=1, experiment_overrides=[
        "federation.min_sites=3", "secure_aggregation.enabled=true", "secure_aggregation.timeout=120",
        "warm_start.source=synthetic", "warm_start.num_samples=300", "warm_start.steps=10",
    ])
    server, server_log = procs.start("server3", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
    wait_until(lambda: "registered site site-g" in text(server_log) or server.poll() is not None, 180, "the SuperLink to start")
    assert server.poll() is None, text(server_log)
    agents = [procs.start(name, [FEDSSL, "site", "start", "--config", str(fed.site_yamls[name])])[0] for name in fed.site_yamls]

    assert server.wait(timeout=600) == 0, text(server_log)
    run_dir = root / "runs" / f"deploy-{root.name}"
    assert (run_dir / WARM_START_FILE).exists(), text(server_log)
    records = site_round_records(run_dir)
    assert sorted((r["site_id"], r["status"]) for r in records) == [(0, "trained"), (1, "trained"), (2, "trained")], records
    statement = (run_dir / "report.md").read_text()
    assert "SecAgg+" in statement and "synthetic" in statement.lower(), statement
    for agent in agents:
        assert stop_agent(agent) == 0
