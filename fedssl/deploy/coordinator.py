"""The coordinator: server.yaml, a SuperLink with TLS and node authentication, the launcher.

``fedssl server start --config server.yaml`` loads server.yaml and the experiment it names
(federation, model, pretext, training — never any site's privacy budget or data location: those
are each site's own) and runs it through the same pipeline as a simulation (fedssl.run.pipeline:
run directory, warm start, run, evaluation, report). :class:`Coordinator` is its launcher: it starts
``flower-superlink`` with TLS and ``--enable-supernode-auth`` on 127.0.0.1 only, puts the Fleet
gateway (fedssl.deploy.gateway: the Fleet API and nothing else) on ``listen.host:listen.port``, registers the public node key of every
site listed in server.yaml (``flwr supernode register``) and submits the run (``flwr run``) with
``config-path``/``run-dir`` pointing at the coordinator's own files; the SuperLink stops when the
run ends, on failure and on SIGTERM too.
"""

from __future__ import annotations

import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fedssl.config import ExperimentConfig, load_config
from fedssl.deploy.gateway import FleetGateway
from fedssl.deploy.pki import LOOPBACK, check_server_certificate, covers_ip, load_node_public_key
from fedssl.deploy.processes import DeployError, ManagedProcess, tls_probe
from fedssl.errors import ConfigError
from fedssl.privacy.watermarks import WATERMARKS_FILE, SiteWatermarks
from fedssl.run.app_stage import APP_STAGE_DIR, stage_app
from fedssl.run.flower_runtime import PROJECT_ROOT, STATE_FLOWER_HOME, FlwrRun, failure_reason, flower_bin, flower_env, run_config
from fedssl.run.pipeline import run_pipeline, say
from fedssl.typed_yaml import check, load_config_file, resolve_path

CONNECTION = "fedssl-deploy"
SUPERLINK_LOG = "superlink.log"
SUPERLINK_PID = "superlink.pid"
GATEWAY_LOG = "gateway.log"


@dataclass
class ListenConfig:
    """What listens where: only the Fleet gateway is public; the SuperLink (Fleet, Control and
    ServerApp runtime APIs on one port in Flower 1.42) binds 127.0.0.1 only."""

    host: str = "0.0.0.0"  # the Fleet gateway's interface: the sites connect here
    port: int = 9092  # the Fleet gateway's port: the sites' coordinator.address
    superlink_port: int = 9093  # the SuperLink's own port, on 127.0.0.1 only
    max_request_mb: float = 64.0  # the largest Fleet request body the gateway accepts

    def validate(self) -> None:
        check(bool(self.host), "listen.host", "must name an interface, e.g. 0.0.0.0 or the public IP", self.host)
        check(1 <= self.port <= 65535, "listen.port", "must be a port number", self.port)
        check(1 <= self.superlink_port <= 65535, "listen.superlink_port", "must be a port number", self.superlink_port)
        check(self.superlink_port != self.port, "listen.superlink_port", "must differ from listen.port (the public gateway's)", self.superlink_port)
        check(self.max_request_mb > 0, "listen.max_request_mb", "must be > 0", self.max_request_mb)


@dataclass
class TLSConfig:
    ca_cert: str = ""
    server_cert: str = ""
    server_key: str = ""

    def validate(self) -> None:
        for name in ("ca_cert", "server_cert", "server_key"):
            check(bool(getattr(self, name)), f"tls.{name}", "is required (TLS is always on); make it with `fedssl keys`", getattr(self, name))


@dataclass
class SiteEntry:
    name: str = ""
    public_key: str = ""


@dataclass
class ServerConfig:
    experiment: str = ""
    set: list[str] = field(default_factory=list)
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    sites: list[dict] = field(default_factory=list)
    state_dir: str = "coordinator"
    app: str = ""  # the Flower app directory to run; default: this fedssl checkout
    evaluate: bool = True
    run_timeout: float = 3600.0

    def validate(self) -> None:
        check(bool(self.experiment), "experiment", "must name the experiment YAML (federation, model, pretext, training)", self.experiment)
        self.listen.validate()
        self.tls.validate()
        check(bool(self.sites), "sites", "must list at least one site: {name: ..., public_key: <NAME.node.pub>}", self.sites)
        check(self.run_timeout > 0, "run_timeout", "must be > 0 seconds", self.run_timeout)

    def site_entries(self) -> list[SiteEntry]:
        entries = []
        for i, raw in enumerate(self.sites):
            if not isinstance(raw, dict) or set(raw) - {"name", "public_key"} or not raw.get("name") or not raw.get("public_key"):
                raise ConfigError(f"sites[{i}]: must be a mapping with name and public_key, got {raw!r}")
            entries.append(SiteEntry(str(raw["name"]), str(raw["public_key"])))
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"sites: site name {dupes[0]!r} is listed twice")
        return entries

    @property
    def address(self) -> str:
        """Where the coordinator's own `flwr` commands reach the SuperLink: loopback only."""
        return f"{LOOPBACK}:{self.listen.superlink_port}"


def load_server_config(path: str | Path) -> ServerConfig:
    """Read and validate server.yaml; relative paths are taken relative to the file."""
    config, base = load_config_file(ServerConfig, path, what="server config", example="configs/deploy/server.yaml",
                                    sections="experiment, listen, tls, sites, state_dir, ...")

    def resolve(value: str) -> str:
        return resolve_path(base, value)

    config.experiment = resolve(config.experiment)
    config.state_dir = resolve(config.state_dir)
    config.app = resolve(config.app) if config.app else str(PROJECT_ROOT)
    if not (Path(config.app) / "pyproject.toml").is_file():
        raise ConfigError(f"app: {config.app} is not a Flower app directory (no pyproject.toml)")
    if Path(config.state_dir).is_relative_to(config.app):
        # `flwr run` packs the app directory's .py/.yaml/.json files into the bundle it ships to every site
        raise ConfigError(f"state_dir: {config.state_dir} is inside the app directory {config.app}; put it elsewhere, or it is shipped to the sites")
    for name in ("ca_cert", "server_cert", "server_key"):
        setattr(config.tls, name, resolve(getattr(config.tls, name)))
    config.sites = [{"name": e.name, "public_key": resolve(e.public_key)} for e in config.site_entries()]
    return config


def experiment_for(config: ServerConfig, extra_overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment server.yaml names, with its ``set:`` overrides and then ``extra_overrides``."""
    return load_config(config.experiment, [*config.set, *(extra_overrides or [])])


def check_tls(config: ServerConfig) -> None:
    """The SuperLink's certificate: signed by the federation's CA, valid, and covering loopback."""
    tls = config.tls
    check = check_server_certificate(Path(tls.server_cert), Path(tls.ca_cert))
    if not check.ok:
        raise DeployError(f"tls.server_cert: {check.detail}")
    if not covers_ip(Path(tls.server_cert), LOOPBACK):
        raise DeployError(f"tls.server_cert: {tls.server_cert} does not list {LOOPBACK}, where the coordinator reaches its own "
                          "SuperLink; reissue it with `fedssl keys server-cert` (which always adds it)")


def check_credentials(config: ServerConfig) -> None:
    """Certificates and the sites' node keys, read before anything is written or started (one line each)."""
    check_tls(config)
    for entry in config.site_entries():
        try:
            load_node_public_key(Path(entry.public_key))
        except ConfigError as err:
            raise ConfigError(f"sites[{entry.name}].public_key: {err}") from None


def start_server(config_path: str | Path, *, overrides: list[str] | None = None, overwrite: bool = False,
                 stream: bool = True, echo=say, resume: str | Path | None = None) -> Path:
    """`fedssl server start`: the whole coordinator side; returns the run directory.

    ``resume``: a run directory this coordinator left after completing some rounds; its remaining rounds
    run with its own saved config and run id (fedssl.run.pipeline.resume_pipeline), ``overrides`` refused."""
    config = load_server_config(config_path)
    check_credentials(config)
    coordinator = Coordinator(config, stream=stream, echo=echo)
    SiteWatermarks(Path(config.state_dir) / WATERMARKS_FILE)  # an unreadable record of site budgets: one line, before Flower
    if resume is not None:
        from fedssl.run.pipeline import resume_pipeline

        return resume_pipeline(Path(resume), coordinator, evaluate=config.evaluate, echo=echo)
    experiment = experiment_for(config, overrides)
    if experiment.federation.min_sites > len(coordinator.entries):
        raise ConfigError(f"federation.min_sites: {experiment.federation.min_sites} sites required but server.yaml lists {len(coordinator.entries)}")
    return run_pipeline(experiment, coordinator, overwrite=overwrite, evaluate=config.evaluate, echo=echo)


class Coordinator:
    """The launcher of `fedssl server start` (see fedssl.run.pipeline.Launcher)."""

    evaluation_optional = True  # the coordinator may hold no consented labels: then the report has no evaluation
    simulates_sites = False  # each site's data and budget are its own (site.yaml): the preflight checks the config only

    def __init__(self, config: ServerConfig, *, stream: bool = True, echo=say) -> None:
        self.config, self.stream, self.echo = config, stream, echo
        self.entries = config.site_entries()
        self.results_timeout = config.run_timeout

    def input_shape(self, experiment: ExperimentConfig) -> list[int]:
        # The coordinator holds no site data; it can read the shape only from a public source.
        try:
            from fedssl.experiment import central_data_for

            return list(central_data_for(experiment).train.input_shape)
        except Exception:  # noqa: BLE001 - any failure means: the operator must say it
            raise ConfigError("model.input_shape: set it in the experiment (e.g. [1, 8, 8]); the coordinator has no site data to read it from") from None

    def describe(self, experiment: ExperimentConfig) -> str:
        return (f"{len(self.entries)} registered site(s), {experiment.federation.rounds} rounds, "
                f"pretext {experiment.pretext.name}; each site applies its own privacy budget")

    def summary_fields(self) -> dict:
        return {"deployment": True, "registered_sites": [e.name for e in self.entries]}

    def start(self, experiment: ExperimentConfig, run_dir: Path, resume: bool = False) -> FlwrRun:
        """Start the SuperLink, register the sites, submit the run (``resume``: from the run dir's checkpoint);
        the run's end stops the SuperLink."""
        link = SuperLink(self.config, echo=self.echo)
        # SIGTERM must stop the SuperLink too (it runs in its own process group): turn it into
        # SystemExit, so that the pipeline aborts the run and the SuperLink is stopped.
        previous = signal.signal(signal.SIGTERM, _raise_exit)

        def stop() -> None:
            signal.signal(signal.SIGTERM, previous)
            link.stop()

        try:
            link.start()
            link.register(self.entries)
            self.echo(f"fedssl: waiting for {experiment.federation.min_sites} site(s) to connect, then training")
            return link.submit(run_dir, stream=self.stream, on_exit=stop, resume=resume)
        except BaseException:
            stop()  # idempotent: a run that failed to start has already called it
            raise


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------- the SuperLink


class SuperLink:
    """A running ``flower-superlink`` with TLS and node authentication."""

    def __init__(self, config: ServerConfig, echo=say) -> None:
        self.config = config
        self.state = Path(config.state_dir)
        self.home = self.state / STATE_FLOWER_HOME
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home, pythonpath=[PROJECT_ROOT])
        self.echo = echo
        self.process: ManagedProcess | None = None
        self.gateway: FleetGateway | None = None
        self._write_connection()

    def _write_connection(self) -> None:
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.config.address}"\nroot-certificates = "{self.config.tls.ca_cert}"\n'
        )

    def start(self, timeout: float = 60.0) -> None:
        """The SuperLink on loopback, then the public Fleet gateway in front of it."""
        tls, listen = self.config.tls, self.config.listen
        check_tls(self.config)
        cmd = [
            flower_bin("flower-superlink"),
            "--ssl-ca-certfile", tls.ca_cert, "--ssl-certfile", tls.server_cert, "--ssl-keyfile", tls.server_key,
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", LOOPBACK, "--port", str(listen.superlink_port),  # Control API: never on the network
        ]
        self.process = ManagedProcess("SuperLink", cmd, self.state / SUPERLINK_LOG, self.env)
        # Its own process group: if this coordinator process is SIGKILLed, the pid file says what to stop.
        (self.state / SUPERLINK_PID).write_text(f"{self.process.pid}\n")
        self.process.wait_for(lambda: tls_probe(self.config.address, Path(tls.ca_cert), timeout=2)[0], timeout, "accepting TLS connections")
        self.gateway = FleetGateway(listen.host, listen.port, listen.superlink_port, cert=Path(tls.server_cert),
                                    key=Path(tls.server_key), ca=Path(tls.ca_cert),
                                    max_bytes=int(listen.max_request_mb * 2**20), log_path=self.state / GATEWAY_LOG)
        self.gateway.start()
        self.echo(f"fedssl: SuperLink up on {self.config.address} (TLS, node authentication on; log {self.state / SUPERLINK_LOG}); "
                  f"Fleet API gateway on {listen.host}:{listen.port} (log {self.state / GATEWAY_LOG})")

    def register(self, entries: list[SiteEntry]) -> None:
        """Register every listed site's node key; only these sites can connect."""
        for entry in entries:
            load_node_public_key(Path(entry.public_key))  # a clear error before Flower's

        def one(entry: SiteEntry) -> tuple[SiteEntry, subprocess.CompletedProcess]:
            cmd = [flower_bin("flwr"), "supernode", "register", entry.public_key, CONNECTION, "--name", entry.name]
            return entry, subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120, cwd=self.state)

        with ThreadPoolExecutor(max_workers=4) as pool:
            for entry, done in pool.map(one, entries):
                if done.returncode != 0:
                    raise DeployError(f"registering site {entry.name} ({entry.public_key}) failed: {failure_reason(done.stdout + done.stderr)}")
                self.echo(f"fedssl: registered site {entry.name} ({Path(entry.public_key).name})")

    def submit(self, run_dir: Path, *, stream: bool, on_exit, resume: bool = False) -> FlwrRun:
        """Submit the federated run (`flwr run`); returns at once, streaming progress."""
        app = Path(self.config.app or PROJECT_ROOT)
        # A directory is staged first (fedssl.run.app_stage): the same FAB, without walking .venv/ and runs/.
        shipped = stage_app(app, self.state / APP_STAGE_DIR) if app.is_dir() else app
        cmd = [flower_bin("flwr"), "run", str(shipped), CONNECTION, "--stream", "--run-config", run_config(run_dir, self.state, resume=resume)]
        return FlwrRun(cmd, run_dir=run_dir, env=self.env, cwd=app, stream=stream, echo=self.echo, on_exit=on_exit, error=DeployError)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.process is not None:
            self.process.stop()
            self.process = None
            (self.state / SUPERLINK_PID).unlink(missing_ok=True)

