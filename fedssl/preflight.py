"""Preflight: every mismatch between a config and its data that can be known before anything starts.

The run pipeline (fedssl.run.pipeline) calls :func:`require_preflight` before torch, Flower or Ray is
imported, and ``fedssl check CONFIG`` runs the same check alone. It reads the config and a cheap
probe of the data (fedssl.data.probe: headers, the first image, a CSV's first rows) and lists every
problem, each one line naming the config key and the fix:

- the data source can be read as data at all (``data.source``, ``data.kind``);
- ``model.input_shape``, when set, is the data's sample shape;
- the encoder takes the data's modality (cnn/resnet need images, mlp takes vectors) (``model.encoder``);
- the pretext task works on that modality and shape (rotation: square images; masked reconstruction:
  patches that tile the image) (``pretext.name``, ``pretext.params.*``, ``warm_start.*``);
- label skew and the evaluation have consented labels to use (``data.partition``, ``evaluation.*``);
- every simulated site gets rows, and the planned rounds x steps fit each site's privacy policy at
  its noise floor (fedssl.privacy.feasibility);
- with ``data.site_sources`` (one source per simulated site), each is read and holds samples of the
  central data's shape, and the plan fits each site's own size.

Without torch, on purpose: a wrong config is answered in well under a second instead of after
seconds of imports and a federation's worth of tracebacks. Only the rules of fedssl.inputs are
used (including which tasks couple samples, so cannot run under DP); a task's parameter types are
the pretext registry's, checked next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedssl.config import ExperimentConfig, load_config
from fedssl.data.probe import KINDS, DataProbe, probe_data, probe_labels
from fedssl.errors import ConfigError, DataError
from fedssl.inputs import PRETEXT_MODALITIES, describe_shape, dp_problem, encoder_input_problem, pretext_input_problem
from fedssl.privacy.feasibility import PlannedRun, plan_problems
from fedssl.tables import SchemaError


@dataclass(frozen=True)
class Problem:
    key: str  # the dotted config key to change
    message: str  # what does not fit, and the fix

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class PreflightError(ConfigError):
    """The config does not fit its data: one line per problem, every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(map(str, self.problems)))


@dataclass(frozen=True)
class Preflight:
    problems: list[Problem] = field(default_factory=list)
    probe: DataProbe | None = None  # None: the data was not probed (a deployment's sites hold it) or is unreadable

    def raise_for_problems(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)


def preflight(config: ExperimentConfig, *, simulated_sites: bool = True, evaluate: bool = True,
              evaluation_optional: bool = False) -> Preflight:
    """Every problem of ``config`` with its data.

    ``simulated_sites``: data.source is the sites' data (a simulation), so its shape, labels and size
    are the sites'; False for a deployment, where each site holds its own data and budget.
    ``evaluate`` and ``evaluation_optional``: whether a run without labels to evaluate on is a problem.
    """
    problems: list[Problem] = []
    needs_labels = evaluate and config.evaluation.enabled and not evaluation_optional
    probe = _probe(config, problems) if simulated_sites or needs_labels else None
    site_probes = _site_source_probes(config, probe, problems) if simulated_sites and config.data.site_sources else None
    sites_probe = (site_probes[0] if site_probes else None) if config.data.site_sources else (probe if simulated_sites else None)
    shape = tuple(config.model.input_shape) or (sites_probe.sample_shape if sites_probe else ())
    if sites_probe is not None and config.model.input_shape and shape != sites_probe.sample_shape:
        problems.append(Problem("model.input_shape", f"is {list(shape)} but data.source holds {sites_probe.describe()}; "
                                f"set model.input_shape={list(sites_probe.sample_shape)} or leave it empty to read it from the data"))
    problems += _pretext_name_problems(config)
    if shape:
        problems += _input_problems(config, shape, sites_probe)
    problems += _warm_start_problems(config, shape)
    if probe is not None:
        problems += _label_problems(config, probe, simulated_sites=simulated_sites, needs_labels=needs_labels)
    if site_probes:
        problems += [problem for i, site in enumerate(site_probes) for problem in _site_problems(config, site, site=i)]
    elif sites_probe is not None:
        problems += _site_problems(config, sites_probe)
    return Preflight(problems, probe)


def require_preflight(config: ExperimentConfig, **options) -> DataProbe | None:
    """:func:`preflight`, raising :class:`PreflightError` (every problem) unless the config fits."""
    result = preflight(config, **options)
    result.raise_for_problems()
    return result.probe


def check_file(path: str | Path, overrides: list[str] | None = None, *, evaluate: bool = True) -> Preflight:
    """``fedssl check``: load the config (its own one-line errors) and preflight it as a simulation."""
    return preflight(load_config(path, overrides), evaluate=evaluate)


def _probe(config: ExperimentConfig, problems: list[Problem]) -> DataProbe | None:
    kind = config.data.kind
    if kind != "auto" and kind not in KINDS:
        problems.append(Problem("data.kind", f"unknown data kind {kind!r}; valid choices: auto, {', '.join(KINDS)}"))
        return None
    try:
        probe = probe_data(config.data.source, kind, config.data, labels=config.data.labels)
    except DataError as err:
        problems.append(Problem("data.categorical" if isinstance(err, SchemaError) else "data.source", str(err)))
        return None
    if config.data.labels is not None:
        try:
            return replace(probe, labelled_count=probe_labels(config.data.labels, probe))
        except DataError as err:
            problems.append(Problem("data.labels", str(err).removeprefix("data.labels: ")))
            return replace(probe, labelled=False)
    return probe


def _site_source_probes(config: ExperimentConfig, central: DataProbe | None, problems: list[Problem]) -> list[DataProbe] | None:
    """Each data.site_sources entry probed like data.source, and of the central data's shape (the evaluation
    encodes data.source with the sites' encoder); None when one cannot be read."""
    data, probes = config.data, []
    for i, source in enumerate(data.site_sources):
        try:
            probes.append(probe_data(source, data.kind, data))
        except DataError as err:
            problems.append(Problem("data.site_sources", f"site {i} ({source}): {err}"))
    if len(probes) < len(data.site_sources):
        return None
    for i, site in enumerate(probes):
        if central is not None and (site.modality, site.sample_shape) != (central.modality, central.sample_shape):
            problems.append(Problem("data.site_sources", f"site {i} ({site.source}) holds {site.describe()} but data.source "
                                    f"{central.source}, the central evaluation's data, holds {central.describe()}; give every "
                                    "site and data.source samples of one shape"))
    return probes


def _pretext_name_problems(config: ExperimentConfig) -> list[Problem]:
    valid = ", ".join(sorted(PRETEXT_MODALITIES))
    names = [("pretext.name", config.pretext.name)]
    if config.warm_start.source == "synthetic":
        names.append(("warm_start.pretext", config.warm_start.pretext))
    problems = [Problem(key, f"unknown pretext {name!r}; valid choices: {valid}") for key, name in names if name not in PRETEXT_MODALITIES]
    if config.privacy.enabled and (problem := dp_problem(config.pretext.name)) is not None:
        problems.append(Problem("pretext.name", problem))
    return problems


def _input_problems(config: ExperimentConfig, shape: tuple[int, ...], probe: DataProbe | None) -> list[Problem]:
    """The encoder and the pretext task against the samples' shape."""
    problems = []
    where = f" (data.source {probe.source})" if probe is not None else ""
    modality = probe.modality if probe is not None else None  # text is not told from vectors by shape
    if (problem := encoder_input_problem(config.model.encoder, shape, modality)) is not None:
        problems.append(Problem("model.encoder", problem + where))
    if (found := pretext_input_problem(config.pretext.name, config.pretext.params, shape, modality)) is not None:
        key, problem = found
        problems.append(Problem(key, problem + where))
    return problems


def _warm_start_problems(config: ExperimentConfig, shape: tuple[int, ...]) -> list[Problem]:
    ws = config.warm_start
    if ws.source == "path" and ws.path and not Path(ws.path).is_file():
        return [Problem("warm_start.path", f"{ws.path} does not exist; point it at a checkpoint file, or set warm_start.source=none")]
    if ws.source == "synthetic" and shape:
        from fedssl.data.synthetic import SIDES

        if not (len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2] and shape[1] in SIDES):
            sides = ", ".join(f"1x{s}x{s}" for s in SIDES)
            return [Problem("warm_start.source", f"synthetic renders {sides} digits, but the samples are {describe_shape(shape)}; "
                            "use warm_start.source=path with an encoder pretrained on public data of this shape, or none")]
    return []


def _label_problems(config: ExperimentConfig, probe: DataProbe, *, simulated_sites: bool, needs_labels: bool) -> list[Problem]:
    """Label skew and the evaluation read labels through the consent manifest only (fedssl.experiment)."""
    problems: list[Problem] = []
    consented_train = _consented_training_records(config, probe, problems)
    partitioned = simulated_sites and not config.data.site_sources  # site sources are the sites' own: no partition
    if partitioned and config.data.partition == "dirichlet" and consented_train == 0:
        why = ("no record of the training pool is consented" if probe.labelled
               else f"data.source {probe.source} has no labels (only the embedded digits and sources with data.labels carry labels, behind the consent manifest)")
        problems.append(Problem("data.partition", f"dirichlet label skew needs consented labels, but {why}; "
                                "use data.partition=iid or quantity_skew"))
    if needs_labels and not probe.labelled:
        problems.append(Problem("evaluation.enabled", f"data.source {probe.source} has no labels to evaluate on (only the embedded "
                                "digits and sources with data.labels carry labels, behind the consent manifest); set data.labels to an "
                                "id,label CSV, or evaluation.enabled=false, or pass --skip-evaluation"))
    ev = config.evaluation
    scored = round(consented_train * ev.validation_fraction)
    if needs_labels and probe.labelled and ev.scores_validation and not ev.min_labels <= scored < consented_train:
        problems.append(Problem("evaluation.validation_fraction", f"{ev.validation_fraction:g} of the ~{consented_train} "
                                f"consented training records is {scored} to score on; it must be at least evaluation.min_labels "
                                f"({ev.min_labels}) and leave a label pool: consent more records or pick a fraction nearer 0.3"))
    return problems


def _consented_training_records(config: ExperimentConfig, probe: DataProbe, problems: list[Problem]) -> int:
    """How many training-pool records have consented labels (the test set is drawn from the consented first)."""
    if not probe.labelled:
        return 0
    ev = config.evaluation
    num_test = round(probe.count * config.data.test_fraction)
    labelled = probe.count if probe.labelled_count is None else probe.labelled_count
    if ev.consent_manifest is None:  # the demo consent: the test set plus consented_fraction of the other labelled
        if labelled < num_test:
            problems.append(Problem("data.labels", f"labels {labelled} of {probe.count} samples but the test set needs "
                                    f"{num_test} (data.test_fraction={config.data.test_fraction:g}); label more or lower data.test_fraction"))
            return 0
        return round(ev.consented_fraction * (labelled - num_test))
    from fedssl.data.consent import ConsentManifest

    try:
        manifest = ConsentManifest.load(ev.consent_manifest)
    except DataError as err:
        problems.append(Problem("evaluation.consent_manifest", str(err)))
        return 0
    consented = sum(1 for sample_id in probe.sample_ids() if sample_id in manifest)
    if consented < num_test:
        problems.append(Problem("evaluation.consent_manifest", f"the test set ({num_test} records, data.test_fraction="
                                f"{config.data.test_fraction:g}) is drawn from consented records but only {consented} of "
                                f"{probe.count} are consented; consent more records or lower data.test_fraction"))
        return 0
    return consented - num_test


def _site_problems(config: ExperimentConfig, probe: DataProbe, site: int | None = None) -> list[Problem]:
    """Every simulated site needs rows, and the plan must fit a site's privacy policy: the average site's size for
    a partition of data.source, each site's own for data.site_sources (``site``: its index)."""
    fed, training = config.federation, config.training
    if site is None:
        train_rows = probe.count - round(probe.count * config.data.test_fraction)
        if train_rows < fed.num_sites:
            return [Problem("federation.num_sites", f"{fed.num_sites} sites cannot share the {train_rows} training rows of "
                            f"data.source {probe.source} (every site needs one); use fewer sites or more data")]
        site_rows = train_rows // fed.num_sites
    else:
        site_rows = probe.count
    plan = PlannedRun(site_rows=site_rows, batch_size=training.batch_size,
                      local_steps=training.local_steps, rounds=fed.rounds)
    where = "" if site is None else f" (site {site}, {probe.source}: {site_rows} rows)"
    problems = [Problem(key, message + where) for key, message in plan_problems(config.privacy, plan)]
    delta = config.privacy.delta
    if config.privacy.enabled and delta * site_rows >= 1:
        # δ is the chance the guarantee fails outright; at 1/n it covers releasing one whole record.
        problems.append(Problem("privacy.delta", f"{delta:g} is not below 1/n for a site's ~{site_rows} rows{where}; "
                                f"use privacy.delta <= {0.1 / site_rows:.1g} (well below 1/n)"))
    return problems
