"""Test harness: run the real apps under `flwr run`, recording what the server receives.

A throw-away Flower app directory holds a pyproject whose components are two thin wrappers:
- the server wrapper hands the production ``server.server_app.main`` a Grid that records every
  message the ServerApp sends and every reply it receives (picklable numpy/python copies);
- the client wrapper loads the production ``clients.client_app.app`` unchanged and only patches
  ``fedssl.site_round.train_round`` (which both paths call) to keep each site's true (unmasked) result, and to make chosen
  sites drop out (raise after training) or refuse (budget-spent reply) in chosen rounds; its handler can make a
  chosen site malicious (poison the reply after the production app built it).
(The Simulation Engine pickles the ClientApp into its Ray workers; the wrapper's handler lives in
the wrapper module so that each worker imports it, and the patch, first.) Everything else is the real path: `flwr run`, the Simulation Engine, SecAgg+, Opacus, ledgers.
"""

from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SERVER_TAP = "fedssl_tap_server"
CLIENT_TAP = "fedssl_tap_client"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedssl-tap"
version = "0.1.0"
description = "fedssl test harness: the production apps behind recording wrappers"
dependencies = []

[tool.flwr.app]
publisher = "fedssl"

[tool.flwr.app.components]
serverapp = "{server}:app"
clientapp = "{client}:app"

[tool.flwr.app.config]
config-path = ""
run-dir = ""
"""

SERVER_SOURCE = '''\
"""Production ServerApp behind a Grid that records everything the server sends and receives."""
import pickle
from pathlib import Path

import numpy as np
from flwr.serverapp import Grid, ServerApp

from server.server_app import main as production_main

TAP_DIR = Path({tap_dir!r})


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _snapshot(msg, direction):
    content = msg.content if msg.has_content() else None
    return {{
        "direction": direction,
        "src": msg.metadata.src_node_id,
        "dst": msg.metadata.dst_node_id,
        "type": msg.metadata.message_type,
        "group": msg.metadata.group_id,
        "error": msg.has_error(),
        "arrays": {{}} if content is None else {{
            name: {{k: np.array(v.numpy()) for k, v in rec.items()}} for name, rec in content.array_records.items()
        }},
        "metrics": {{}} if content is None else {{name: dict(rec) for name, rec in content.metric_records.items()}},
        "configs": {{}} if content is None else {{
            name: {{k: _plain(v) for k, v in rec.items()}} for name, rec in content.config_records.items()
        }},
    }}


class RecordingGrid(Grid):
    """Records at push/pull: production wraps this Grid (PromptGrid), so its send_and_receive is not ours."""

    def __init__(self, inner):
        self._inner = inner
        self._exchanges = []  # {{"sent": [...], "received": [...]}} per push, in order
        self._exchange_of = {{}}  # pushed message id -> index into _exchanges

    def set_run(self, run):
        return self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(self, *args, **kwargs):
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self._inner.get_node_ids()

    def get_nodes(self):
        return self._inner.get_nodes()

    def push_messages(self, messages):
        messages = list(messages)
        if not messages:
            return self._inner.push_messages(messages)
        index = len(self._exchanges)
        self._exchanges.append({{"sent": [_snapshot(m, "request") for m in messages], "received": []}})
        ids = list(self._inner.push_messages(messages))
        for message_id in ids:
            self._exchange_of[message_id] = index
        self._save(index)
        return ids

    def pull_messages(self, message_ids):
        replies = list(self._inner.pull_messages(message_ids))
        touched = set()
        for reply in replies:
            index = self._exchange_of.get(reply.metadata.reply_to_message_id)
            if index is not None:
                self._exchanges[index]["received"].append(_snapshot(reply, "reply"))
                touched.add(index)
        for index in touched:
            self._save(index)
        return replies

    def send_and_receive(self, messages, *args, **kwargs):
        return self._inner.send_and_receive(messages, *args, **kwargs)  # unused: PromptGrid pulls through us

    def _save(self, index):
        TAP_DIR.mkdir(parents=True, exist_ok=True)
        with (TAP_DIR / f"server-{{index:04d}}.pkl").open("wb") as handle:
            pickle.dump(self._exchanges[index], handle)


app = ServerApp()


@app.main()
def main(grid, context):
    production_main(RecordingGrid(grid), context)
'''

CLIENT_SOURCE = '''\
"""Production ClientApp; the SecAgg+ site's train_round is wrapped to keep the truth and inject faults."""
import pickle
from pathlib import Path

from flwr.clientapp import ClientApp

import fedssl.site_round as site_round
from clients.client_app import app as production_app
from fedssl.fl.keys import STATUS_REFUSED
from fedssl.fl.records import RoundResult
from fedssl.fl.site_reply import released_num_examples

TAP_DIR = Path({tap_dir!r})
DROP = {drop!r}  # {{(round, site_id)}}: crash after training, before anything is sent
REFUSE = {refuse!r}  # {{(round, site_id)}}: reply as a site whose budget is spent
POISON = {poison!r}  # {{(round, site_id): value}}: a malicious site sets every weight of its reply to value
_real_train_round = site_round.train_round


def _tapped(dataset, global_encoder, plan, site):
    key = (plan.server_round, site.site_id)
    if key in REFUSE:
        result = RoundResult(status=STATUS_REFUSED, encoder_state=None, num_examples=len(dataset), epsilon=7.5,
                             target_epsilon=8.0, delta=1e-5, reason="test: budget spent")
    else:
        result = _real_train_round(dataset, global_encoder, plan, site)
    TAP_DIR.mkdir(parents=True, exist_ok=True)
    record = {{
        "round": plan.server_round, "site": site.site_id, "status": result.status,
        # the weight the site releases (under DP the plan's batch size x steps, not its exact count)
        "num_examples": released_num_examples(result, plan, site.privacy.enabled),
        "global": {{k: v.numpy().copy() for k, v in global_encoder.items()}},
        "trained": None if result.encoder_state is None else {{k: v.numpy().copy() for k, v in result.encoder_state.items()}},
        "dropped": key in DROP,
    }}
    with (TAP_DIR / f"site-{{site.site_id}}-round-{{plan.server_round}}.pkl").open("wb") as handle:
        pickle.dump(record, handle)
    if key in DROP:
        raise RuntimeError(f"tap: site {{site.site_id}} drops out in round {{plan.server_round}} after training")
    return result


site_round.train_round = _tapped

# The Simulation Engine pickles the ClientApp into its Ray workers, and functions of importable
# modules travel by reference: the handler below makes every worker import this module (and so
# apply the patch above) before delegating to the production app.
app = ClientApp()


@app.train()
def train(msg, context):
    reply = production_app(msg, context)  # the component Flower loads: the production ClientApp, unchanged
    if reply.has_content() and "arrays" in reply.content:
        key = (int(msg.content["config"]["server-round"]), int(reply.content["metrics"]["site-id"]))
        if key in POISON:  # after the site's egress guard: what a malicious site's own code would send
            import numpy as np
            from flwr.app import Array, ArrayRecord
            reply.content["arrays"] = ArrayRecord(
                {{k: Array(np.full_like(a.numpy(), POISON[key])) for k, a in reply.content["arrays"].items()}})
    return reply
'''


def write_tap_app(app_dir: Path, tap_dir: Path, drop: set[tuple[int, int]] = frozenset(), refuse: set[tuple[int, int]] = frozenset(),
                  poison: dict[tuple[int, int], float] | None = None) -> Path:
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(PYPROJECT.format(server=SERVER_TAP, client=CLIENT_TAP))
    (app_dir / f"{SERVER_TAP}.py").write_text(SERVER_SOURCE.format(tap_dir=str(tap_dir)))
    (app_dir / f"{CLIENT_TAP}.py").write_text(
        CLIENT_SOURCE.format(tap_dir=str(tap_dir), drop=set(map(tuple, drop)), refuse=set(map(tuple, refuse)), poison=dict(poison or {}))
    )
    return app_dir


def run_tapped(config, tmp_path: Path, monkeypatch, drop=frozenset(), refuse=frozenset(), poison=None) -> tuple[Path, Path]:
    """Run ``config`` through `flwr run` with the recording apps; returns (run_dir, tap_dir)."""
    from fedssl.experiment import central_data_for
    from fedssl.run import simulation
    from fedssl.run.pipeline import prepare_run_dir

    if not config.model.input_shape:
        config.model.input_shape = list(central_data_for(config).train.input_shape)
    config.run.output_dir = str(tmp_path / "runs")
    tap_dir = tmp_path / "tap"
    app_dir = write_tap_app(tmp_path / "app", tap_dir, drop, refuse, poison)
    monkeypatch.setattr(simulation, "APP_DIR", app_dir)  # the app the launcher stages and runs
    # `flwr run` starts `flower-superlink` from PATH: make sure it is this venv's.
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    run_dir = prepare_run_dir(config, overwrite=True)
    simulation.run_federation(config, run_dir, stream=False)
    return run_dir, tap_dir


@dataclass
class Tap:
    exchanges: list[dict]  # one per non-empty push: {"sent": [...], "received": [...]}
    sites: dict[tuple[int, int], dict]  # (round, site_id) -> the site's truth

    @classmethod
    def load(cls, tap_dir: Path) -> Tap:
        exchanges = [pickle.loads(p.read_bytes()) for p in sorted(tap_dir.glob("server-*.pkl"))]
        sites = {}
        for path in tap_dir.glob("site-*-round-*.pkl"):
            record = pickle.loads(path.read_bytes())
            sites[(record["round"], record["site"])] = record
        return cls(exchanges, sites)

    def replies(self) -> list[dict]:
        return [r for e in self.exchanges for r in e["received"]]

    def stage_exchanges(self, stage: str) -> list[dict]:
        """Exchanges whose requests are the given SecAgg+ stage, in order (one per round)."""
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        return [
            e for e in self.exchanges
            if e["sent"] and e["sent"][0]["configs"].get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE) == stage
        ]


def weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {k: sum(np.asarray(s[k], np.float64) * w for s, w in zip(states, weights)) / total for k in states[0]}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)
