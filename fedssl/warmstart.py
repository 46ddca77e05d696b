"""Warm start: begin the federation from an encoder pretrained on public or synthetic data.

Pretraining on data that is public by construction costs no privacy budget, and on small
private data sets it is often worth more than the private federated step itself (see
benchmarks/README.md). The flow keeps the server free of data loading:

1. before the run, the coordinator's CLI calls :func:`prepare_warm_start`: for
   ``source: synthetic`` it renders synthetic digits (``fedssl.data.synthetic``) and pretrains
   the configured encoder on them without DP; for ``source: path`` it checks and copies a
   checkpoint the operator supplies; either way it writes ``warm_start.pt`` (weights +
   provenance) and ``warm_start.json`` (provenance only) into the run directory;
2. the ServerApp calls :func:`load_warm_start` to load ``warm_start.pt`` into the initial
   encoder it sends to the sites;
3. the central evaluation calls :func:`run_warm_start` to read the same ``warm_start.pt``
   (it stays in the run directory) and scores it beside the federated encoder, so the report
   can say what the private federated step added over its zero-cost start;
4. reports and the audit call :func:`public_pretraining_description` and pass it to the
   privacy statement, which then says what the public data was and that it is not protected.

Only the standard library and fedssl.errors are imported at module level: fedssl.config may
import :class:`WarmStartConfig` cheaply, and the ServerApp may import this module without
pulling in the data layer. Torch, data generation and pretraining are imported when called.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedssl.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

WARM_START_FILE = "warm_start.pt"
WARM_START_INFO = "warm_start.json"
SOURCES = ("none", "synthetic", "path")
FORMAT = "fedssl-warm-start/1"

Progress = Callable[[str], None]


@dataclass
class WarmStartConfig:
    """The ``warm_start`` config section.

    source: none | synthetic | path
      none       the server starts from a random encoder (seeded by run.seed)
      synthetic  pretrain on ``num_samples`` synthetic digits (images shaped 1x8x8 only)
      path       load ``path``: a checkpoint written by this module or a plain encoder
                 state_dict; ``description`` must say what public data it was trained on
    """

    source: str = "none"
    path: str | None = None
    description: str = ""
    num_samples: int = 10000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    pretext: str = "rotation"
    seed: int = 0

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"warm_start.source: valid choices: {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "path":
            if not self.path:
                raise ConfigError("warm_start.path: must name a checkpoint file when warm_start.source is path")
            if not self.description.strip():
                raise ConfigError(
                    "warm_start.description: say what public data the checkpoint was trained on "
                    "(it goes into the privacy statement), e.g. 'ImageNet-1k, public'"
                )
        if self.source == "synthetic":
            for key, value, low in (("num_samples", self.num_samples, 10), ("steps", self.steps, 1), ("batch_size", self.batch_size, 1)):
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ConfigError(f"warm_start.{key}: must be an integer >= {low}, got {value!r}")
            if not 0 < self.lr <= 10:
                raise ConfigError(f"warm_start.lr: must be in (0, 10], got {self.lr!r}")
            if not 0 <= self.momentum < 1:
                raise ConfigError(f"warm_start.momentum: must be in [0, 1), got {self.momentum!r}")
            from fedssl.pretext import get_pretext

            try:
                get_pretext(self.pretext)
            except ConfigError as err:
                raise ConfigError(f"warm_start.pretext: {err}") from None

    @property
    def enabled(self) -> bool:
        return self.source != "none"


# --------------------------------------------------------------------------- pretraining


def pretrain_encoder(
    inputs: torch.Tensor,
    *,
    encoder: str,
    width: int,
    depth: int,
    pretext: str = "rotation",
    pretext_params: Mapping[str, Any] | None = None,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    init_state: Mapping[str, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Non-private self-supervised pretraining of a fresh encoder on ``inputs``; returns its weights.

    Only for data that are public: nothing here is differentially private. Deterministic for
    a given ``seed`` (on one thread).
    """
    import torch

    from fedssl.models import build_encoder
    from fedssl.pretext import get_pretext

    input_shape = tuple(inputs.shape[1:])
    net = build_encoder(encoder, input_shape, width=width, depth=depth, seed=seed)
    if init_state is not None:
        net.load_state_dict(dict(init_state))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_pretext(pretext, dict(pretext_params or {})).build_model(net)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        cursor = 0
        report_every = max(1, steps // 5)
        for step in range(1, steps + 1):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(inputs), generator=generator), 0
            batch = inputs[order[cursor : cursor + batch_size]]
            cursor += batch_size
            optimizer.zero_grad(set_to_none=True)
            loss = model(batch).mean()
            loss.backward()
            optimizer.step()
            model.after_optimizer_step()
            if progress and step % report_every == 0:
                progress(f"warm start: step {step}/{steps}, pretext loss {float(loss.detach()):.3f}")
    return {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}


def synthetic_warm_start(
    ws: WarmStartConfig, *, encoder: str, width: int, depth: int, input_shape: tuple[int, ...], progress: Progress | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Render synthetic digits and pretrain on them; returns (weights, provenance)."""
    import torch

    from fedssl.data import synthetic

    shape = tuple(input_shape)
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2] or shape[1] not in synthetic.SIDES:
        sides = ", ".join(f"1x{s}x{s}" for s in synthetic.SIDES)
        raise ConfigError(
            f"warm_start.source: synthetic renders {sides} digits, but the data are shaped {shape}; "
            "use warm_start.source=path with an encoder pretrained on public data of this shape, or none"
        )
    side = shape[1]
    started = time.perf_counter()
    images, _labels = synthetic.synthetic_digits(ws.num_samples, seed=ws.seed, side=side)  # labels unused: self-supervised
    if progress:
        progress(f"warm start: rendered {ws.num_samples} synthetic digits in {time.perf_counter() - started:.0f}s; pretraining")
    state = pretrain_encoder(
        torch.from_numpy(images), encoder=encoder, width=width, depth=depth, pretext=ws.pretext, steps=ws.steps,
        batch_size=ws.batch_size, lr=ws.lr, momentum=ws.momentum, seed=ws.seed, progress=progress,
    )
    provenance = {
        "source": "synthetic",
        "description": synthetic.describe(ws.num_samples, ws.seed, side),
        "public_data_sha256": synthetic.fingerprint(images),
        "fonts": list(synthetic.font_names()),
        "uses_site_data": False,
        "pretraining": {k: v for k, v in asdict(ws).items() if k not in ("source", "path", "description")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return state, provenance


# --------------------------------------------------------------------------- files


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_warm_start(directory: Path, state: Mapping[str, torch.Tensor], provenance: Mapping[str, Any]) -> Path:
    """Write ``warm_start.pt`` (weights + provenance) and ``warm_start.json`` into ``directory``."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        **provenance,
        "weights_sha256": weights_sha256(state),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path = directory / WARM_START_FILE
    torch.save({"format": FORMAT, "encoder": {k: v.detach().cpu() for k, v in state.items()}, "provenance": info}, path)
    (directory / WARM_START_INFO).write_text(json.dumps(info, indent=1))
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, provenance) of a warm-start checkpoint, or of a plain encoder state_dict."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"warm start checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"cannot read warm start checkpoint {path} ({type(err).__name__}: {err})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return dict(payload["encoder"]), dict(payload.get("provenance", {}))
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return dict(payload), {}
    raise ConfigError(f"{path} is neither a fedssl warm start nor an encoder state_dict")


def load_warm_start(path: Path, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Load the checkpoint at ``path`` into ``encoder`` (strict: same keys and shapes); return the weights.

    The ServerApp calls this on the encoder it built from the config, so a checkpoint for a
    different architecture fails here, with the mismatch named, before any site trains.
    """
    state, provenance = read_checkpoint(path)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ConfigError(f"warm start {path} does not fit model.* (missing {missing[:3]}, unexpected {extra[:3]})")
    wrong = [k for k in expected if expected[k] != got[k]]
    if wrong:
        raise ConfigError(f"warm start {path}: {wrong[0]} is shaped {got[wrong[0]]}, the encoder expects {expected[wrong[0]]}")
    recorded = provenance.get("weights_sha256")
    if recorded and recorded != weights_sha256(state):
        raise ConfigError(f"warm start {path}: weights do not match their recorded sha256; regenerate the warm start")
    encoder.load_state_dict(state, strict=True)
    return state


def prepare_warm_start(config: Any, run_dir: Path, progress: Progress | None = None) -> Path | None:
    """Produce ``run_dir/warm_start.pt`` for ``config.warm_start`` (an ExperimentConfig); None for source none.

    Runs on the coordinator before the federation starts; it never reads site data.
    """
    ws: WarmStartConfig = config.warm_start
    if not ws.enabled:
        return None
    m = config.model
    if not m.input_shape:
        raise ConfigError("model.input_shape: must be known before a warm start (the CLI fills it from the data)")
    if ws.source == "synthetic":
        state, provenance = synthetic_warm_start(
            ws, encoder=m.encoder, width=m.width, depth=m.depth, input_shape=tuple(m.input_shape), progress=progress
        )
    else:
        from fedssl.models import build_encoder

        state, recorded = read_checkpoint(Path(ws.path))
        load_warm_start_state_check(state, build_encoder(m.encoder, m.input_shape, width=m.width, depth=m.depth), ws.path)
        provenance = {
            "source": "path",
            "path": str(Path(ws.path).resolve()),
            "description": ws.description.strip(),
            "uses_site_data": False,
            "recorded_provenance": recorded,
        }
    path = save_warm_start(run_dir, state, provenance)
    if progress:
        progress(f"warm start written to {path} ({provenance['description']})")
    return path


def load_warm_start_state_check(state: Mapping[str, torch.Tensor], encoder: nn.Module, where: Any) -> None:
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ConfigError(f"warm_start.path: {where} does not fit model.* (encoder, width, depth, input_shape must match)")


def run_warm_start(config: Any, run_dir: Path, encoder: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights a finished run's federation started from, loaded into ``encoder``; None without a warm start.

    ``config`` is the run's ExperimentConfig; the run directory's ``warm_start.pt`` (written by
    :func:`prepare_warm_start`, loaded by the ServerApp) is checked against ``encoder`` and its
    recorded sha256 exactly as the server checked it.
    """
    if not config.warm_start.enabled:
        return None
    path = Path(run_dir) / WARM_START_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} missing, but the run's config has warm_start.source={config.warm_start.source}: "
            "the warm start the federation began from is needed to score it; rerun `fedssl simulate`"
        )
    return load_warm_start(path, encoder)


def public_pretraining_description(run_dir: Path) -> str | None:
    """What the run's warm start was trained on, for the privacy statement; None without a warm start."""
    info = Path(run_dir) / WARM_START_INFO
    if not info.is_file():
        return None
    try:
        return str(json.loads(info.read_text()).get("description") or "public data, not described")
    except (OSError, ValueError):
        return "public data (warm_start.json unreadable)"
