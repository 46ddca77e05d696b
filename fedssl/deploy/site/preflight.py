"""Preflight: everything that must hold before a site joins a federation (``fedssl site preflight``).

Each check is a :class:`Check`; a failed blocking one stops ``fedssl site start``. Checking
writes nothing but a probe file in the state dir (created if missing), removed at once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fedssl.deploy.site.config import SiteConfig
from fedssl.deploy.site.status import budget_view
from fedssl.errors import ConfigError, DataError, PrivacyError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    blocking: bool = True


def egress_description(dp_enabled: bool) -> str:
    from fedssl.fl import keys

    released = keys.DP_RELEASED_METRICS if dp_enabled else keys.ALLOWED_METRICS
    under_dp = (
        f"; under DP {keys.NUM_EXAMPLES} is the plan's batch size x local steps, and the pretext loss, training "
        "time and exact example count stay here" if dp_enabled else ""
    )
    return (
        f"encoder weights only (record {keys.ARRAYS!r}: exactly the encoder's parameter names and shapes) and the scalar "
        f"metrics {', '.join(sorted(released))} (record {keys.METRICS!r}){under_dp}. Never raw data, labels, sample ids, "
        "pretext heads or per-sample values (enforced by the egress guard)"
    )


def preflight(config: SiteConfig, *, check_coordinator: bool = True) -> list[Check]:
    """Everything that must hold before this site joins a federation."""
    from fedssl.deploy import pki
    from fedssl.deploy.processes import tls_probe

    checks: list[Check] = []
    # data
    try:
        from fedssl.data.loaders import load_site_data

        dataset = load_site_data(config.data.path, config.data.kind, config.data)
        checks.append(Check("data", True, f"{config.data.path}: {len(dataset)} samples, {dataset.modality}, shape {list(dataset.input_shape)}"))
    except (DataError, ConfigError, ValueError) as err:
        checks.append(Check("data", False, f"data.path: {err}"))
    checks.append(Check("leaves the site", True, egress_description(config.privacy.enabled), blocking=False))
    checks.append(_check_state_dir(config.state_path))
    ledger = _check_ledger(config)
    checks.append(ledger)
    if ledger.ok:  # a ledger that does not verify is the one problem: the budget and mark read the same state
        checks.append(_check_budget(config))
        if config.privacy.enabled:
            checks.append(_check_high_water(config))
    checks.append(_check_ledger_key(config))
    checks.append(_check_node_key(Path(config.keys.node_key)))
    ca = Path(config.coordinator.root_certificates)
    ca_check = pki.check_ca_certificate(ca)
    checks.append(Check("CA certificate", ca_check.ok, ca_check.detail))
    if config.apps.allowed_hashes:
        checks.append(Check("approved apps", True, f"{len(config.apps.allowed_hashes)} hash(es): " + ", ".join(h[:19] + "…" for h in config.apps.allowed_hashes)))
    else:
        checks.append(Check("approved apps", False, "apps.allowed_hashes is empty: every app would be refused; add the hash from `fedssl site app-hash <app.fab>`"))
    if check_coordinator:
        if ca_check.ok:
            ok, detail, days = tls_probe(config.coordinator.address, ca)
            if ok and days is not None and days < pki.EXPIRY_WARNING_DAYS:
                ok, detail = False, f"{config.coordinator.address}: the coordinator's certificate expires in {days:.1f} days; ask it to renew"
            elif ok and days is not None:
                detail += f"; its certificate is valid {days:.0f} more days"
            checks.append(Check("coordinator", ok, detail))
        else:
            checks.append(Check("coordinator", False, "skipped: the CA certificate is not usable"))
    return checks


def _check_state_dir(state: Path) -> Check:
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / f".preflight-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        return Check("state dir", False, f"state_dir {state}: not writable ({err.strerror})")
    return Check("state dir", True, f"{state}: writable")


def _check_ledger(config: SiteConfig) -> Check:
    """The privacy ledger verifies against the site's key (read-only: what training would refuse, said now)."""
    from fedssl.privacy.chain import TORN_WRITE
    from fedssl.privacy.keys import load_signing_key
    from fedssl.privacy.ledger import Ledger, site_key_path

    ledger = Ledger(config.state_path)
    if not ledger.path.exists() or ledger.path.stat().st_size == 0:
        return Check("privacy ledger", True, "no rounds recorded yet")
    key_path = site_key_path(config.state_path, config.ledger_key_path)
    try:
        trusted = load_signing_key(key_path).public_key() if key_path.exists() else None
    except ConfigError:
        trusted = None  # the ledger key check names an unreadable key
    report = ledger.verify(trusted_public_key=trusted)
    blocking = [p for p in report.problems if p.kind != TORN_WRITE]
    if blocking:
        return Check("privacy ledger", False, f"{ledger.path}: {blocking[0]} ({len(blocking)} problem(s)); the site refuses to "
                     f"train on an untrustworthy privacy record and changes nothing. Run `fedssl audit {config.state_path}`")
    return Check("privacy ledger", True, f"{ledger.path.name}: {len(report.records)} records, verified")


def _check_budget(config: SiteConfig) -> Check:
    if not config.privacy.enabled:
        return Check("privacy budget", True, "privacy.enabled is false: this site trains WITHOUT differential privacy", blocking=False)
    try:
        b = budget_view(config)
    except (PrivacyError, ValueError) as err:
        return Check("privacy budget", False, str(err))
    if b.exhausted:
        return Check(
            "privacy budget", False,
            f"spent: eps {b.spent:.3f} of {b.target_epsilon:g}; one more round would reach {b.next_round_epsilon:.3f}. "
            "The site refuses to train; raising privacy.target_epsilon is the operator's decision alone",
        )
    return Check("privacy budget", True, f"eps spent {b.spent:.3f} of {b.target_epsilon:g} (delta {b.delta:g}), {b.left:.3f} left")


def _check_high_water(config: SiteConfig) -> Check:
    """The state dir against the site's signed high-water mark: lost or rolled back, the site would refuse."""
    from fedssl.privacy.budget import EPSILON_SLACK
    from fedssl.privacy.highwater import state_dir_problem

    try:
        problem = state_dir_problem(config.state_path, config.ledger_key_path, config.highwater_path, EPSILON_SLACK)
    except (PrivacyError, ConfigError) as err:
        problem = str(err)
    if problem:
        return Check("high-water mark", False, problem)
    return Check("high-water mark", True, "the state dir is not behind the site's signed high-water mark")


def _check_ledger_key(config: SiteConfig) -> Check:
    from fedssl.privacy.keys import load_signing_key

    path = config.ledger_key_path
    if path is None:
        return Check("ledger key", True, "keys.ledger_key not set: the ledger key is kept in state_dir (set it to a separate path)", blocking=False)
    try:
        load_signing_key(path)
    except ConfigError as err:
        return Check("ledger key", False, f"keys.ledger_key: {err}")
    return _private_file_check("ledger key", path)


def _check_node_key(path: Path) -> Check:
    from fedssl.deploy.pki import load_node_private_key

    try:
        load_node_private_key(path)
    except ConfigError as err:
        return Check("node key", False, f"keys.node_key: {err}")
    return _private_file_check("node key", path)


def _private_file_check(name: str, path: Path) -> Check:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check(name, False, f"{path}: readable by others (mode {mode:o}); chmod 600 {path}")
    return Check(name, True, f"{path}: ok, mode {mode:o}")


def format_checklist(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        mark = "[ok]  " if c.ok else ("[FAIL]" if c.blocking else "[warn]")
        lines.append(f"  {mark} {c.name}: {c.detail}")
    return "\n".join(lines)


def failed_checks(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.blocking and not c.ok]


def preflight_passed(checks: list[Check]) -> bool:
    return not failed_checks(checks)
