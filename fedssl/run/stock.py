"""A run launched by stock `flwr run .` instead of `fedssl simulate`: where its config and run dir are.

fedssl's launchers (fedssl.run.simulation, fedssl.deploy.coordinator) prepare the run directory
first and hand both apps ``config-path=<run dir>/config.yaml run-dir=<run dir>``. `flwr run .`
hands them pyproject's ``[tool.flwr.app.config]`` (or ``--run-config`` overrides) instead: an
experiment config (default: the tiny digits one, shipped in the app bundle) and usually no run dir.
Both apps resolve that here, each on its own and identically, so that the ClientApps find the run
directory the ServerApp prepared without any message between them:

- ``config-path``: absolute, or relative to the app (the bundle holds configs/);
- ``run-dir``: as given, else ``<run.output_dir>/<run.name>-<Flower run id>``. The Flower run id is
  the one name both apps know without talking, and it differs per `flwr run`: a second
  `flwr run .` never lands in (or replaces) an earlier run's ledgers.

The ServerApp prepares the run dir (:func:`prepare_stock_run`: the config, resolved, as
``config.yaml``, the run's record, as `fedssl simulate` writes it); the sites read the same config from
its source and keep their state under the run dir, as in a `fedssl simulate` run. Torch- and
data-free: the ServerApp imports it (tests/test_import_rules.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedssl.config import load_config, save_config
from fedssl.errors import ConfigError
from fedssl.fl.keys import NODE_PARTITION_ID, RUN_CONFIG_PATH, RUN_DIR
from fedssl.layout import RunDir

APP_ROOT = Path(__file__).resolve().parents[2]  # the app bundle (or checkout) holding configs/
DEFAULT_CONFIG = "configs/experiments/flwr-run.yaml"  # pyproject's default config-path: seconds long
POST_RUN_COMMAND = "fedssl evaluate"  # the evaluation and report, which never run inside the ServerApp


@dataclass(frozen=True)
class Launch:
    """Where a run's files are. ``source``: the experiment config given (the run dir's own config.yaml
    when a fedssl launcher started the run); ``stock``: started by `flwr run` directly."""

    source: Path
    run_dir: Path
    stock: bool

    @property
    def config_path(self) -> Path:
        """The config both apps run with: the run dir's copy (prepared before the first round)."""
        return RunDir(self.run_dir).config

    def run_config(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` with the config path resolved and the run dir a ClientApp uses. The config is the source
        itself, not the run dir's copy: a stock run's copy is the same config (no input shape is filled in),
        and a site's round must not depend on when the ServerApp wrote the copy."""
        return {**given, RUN_CONFIG_PATH: str(self.source), RUN_DIR: str(self.run_dir)}


def resolve_launch(run_config: Mapping[str, Any], run_id: int | str) -> Launch:
    """The run's config and directory from Flower's run config (and its run id, for a default run dir)."""
    config_path, run_dir = str(run_config.get(RUN_CONFIG_PATH) or ""), str(run_config.get(RUN_DIR) or "")
    if config_path and run_dir and Path(config_path) == RunDir(run_dir).config:  # a fedssl launcher's run config
        return Launch(Path(config_path), Path(run_dir), stock=False)
    source = _source_config(config_path or DEFAULT_CONFIG)
    if not run_dir:
        config = load_config(str(source))
        run_dir = str(config.run_dir().with_name(f"{config.run.name}-{run_id}"))
    return Launch(source, Path(run_dir).resolve(), stock=True)


def _source_config(given: str) -> Path:
    path = Path(given).expanduser()
    if not path.is_absolute():
        path = APP_ROOT / path
    if not path.is_file():
        raise ConfigError(f"run config: config-path {given!r} is not a file (relative paths are relative to the app, {APP_ROOT}); "
                          "pass --run-config \"config-path='/absolute/path.yaml'\"")
    return path


def prepare_stock_run(launch: Launch) -> None:
    """What `fedssl simulate` does before Flower starts that needs neither data nor torch: the run dir
    with the resolved config. What does need them is refused with one line naming the fix."""
    config = load_config(str(launch.source))
    if config.warm_start.enabled:
        raise ConfigError(f"warm_start.enabled: {launch.source} pretrains on the coordinator before the first round, which "
                          f"`flwr run` cannot do; run it with `fedssl simulate {launch.source}`")
    if not config.model.input_shape:
        raise ConfigError(f"model.input_shape: set it in {launch.source} for `flwr run` (the ServerApp never reads data; "
                          "`fedssl simulate` fills it from the data)")
    run_dir = RunDir(launch.run_dir)
    if run_dir.config.exists():
        raise ConfigError(f"run-dir {launch.run_dir} holds a run already; pass another run-dir, or leave it out for a new one")
    launch.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir.config)


def launch_run_config(context: Any) -> Mapping[str, Any]:
    """A ClientApp's run config (``context``: Flower's Context): a simulated site's resolved as above,
    a deployed site's (which names its own site.yaml) as given."""
    if NODE_PARTITION_ID not in context.node_config:
        return context.run_config
    return resolve_launch(context.run_config, context.run_id).run_config(context.run_config)
