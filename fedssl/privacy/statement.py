"""The plain-language privacy statement printed by `fedssl audit` and put into reports.

It says what the numbers protect, what has to hold for that, and — as plainly — what they
do not protect. Text only; the numbers come from the caller (the audit's per-site results).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedssl.fl import keys

# Everything a DP site releases besides its noised encoder weights (keys.DP_RELEASED_METRICS, which
# the egress guard enforces), in plain words; a test holds the two together, so the statement
# cannot describe fewer values than actually leave a site.
RELEASED_UNDER_DP = {
    keys.EPSILON: "the ε it has spent so far",
    keys.TARGET_EPSILON: "its ε budget",
    keys.DELTA: "its δ",
    keys.SITE_ID: "its site number",
    keys.DP_ENABLED: "that it trains with DP",
    keys.STATUS: "whether it trained or refused the round",
    keys.STEPS: "the number of steps the plan asked for",
    keys.LEDGER_SEQ: "its ledger's sequence number",
    keys.NUM_EXAMPLES: "as its averaging weight the plan's batch size × local steps (not its number of examples)",
}
KEPT_AT_SITE = (
    "Its pretext loss, its training time and its exact number of examples never leave it: they are "
    "computed from the data without noise."
)

OPACUS_SECURE_RNG_CAVEAT = (
    "Noise is drawn with PyTorch's standard pseudo-random generator: Opacus's secure_mode "
    "(a cryptographically secure generator) is off because torchcsprng cannot be installed here. "
    "The guarantee is therefore proven for ideal Gaussian noise, not against an adversary able to "
    "predict the generator's output."
)


def _site_line(site: Mapping[str, Any]) -> str:
    epsilon = site.get("epsilon")
    delta = "δ not recorded" if site.get("delta") is None else f"δ = {float(site['delta']):g}"
    spent = "no DP training recorded" if epsilon is None else f"ε = {float(epsilon):.3f}, {delta}"
    accountant = f" ({site['accountant']} accountant)" if site.get("accountant") else ""
    return f"- {site['site_id']}: {spent}{accountant}"


def _released_line() -> str:
    return (
        "**What a site releases.** Its noised encoder weights, and besides them only values fixed by its own "
        "settings, the plan and its charge history, never computed from its records: " + "; ".join(RELEASED_UNDER_DP.values()) + ". " + KEPT_AT_SITE + " Its Poisson sampling, its "
        "noise and its augmentations are drawn from its operating system's entropy, so the coordinator, who "
        "chooses the plan and its seed, cannot reproduce them."
    )


def _secure_aggregation_line(secure_aggregation: bool | None) -> str:
    if secure_aggregation is None:
        return "Whether secure aggregation was used is not recorded in the ledgers; the guarantee above does not depend on it."
    if secure_aggregation:
        return (
            "Secure aggregation (Flower's SecAgg+) hid individual sites' updates from the server: it received "
            "only masked vectors and unmasked their sum. That holds against a server that follows the protocol "
            "(honest-but-curious) and colludes with fewer sites than the reconstruction threshold; it is "
            "confidentiality, not an additional differential-privacy guarantee. Each site's "
            "scalar report (ε, status, its data-independent weight, step count) still reached the server in the clear."
        )
    return "Without secure aggregation the server sees each site's (noised) update individually; the guarantee above holds against it too."


def _not_covered(site_level: Mapping[str, Any] | None, secure_aggregation: bool | None) -> list[str]:
    whole_site = (
        f"a site-level guarantee of ε = {float(site_level['epsilon']):.3f}, δ = {float(site_level['delta']):g} "
        f"({site_level.get('mechanism', 'server-side mechanism')}) applies to that."
        if site_level
        else "there is no site-level (user-level) differential privacy in this run."
    )
    return [
        "**Not covered.**",
        "- Whether a whole site took part, or a site's aggregate properties: " + whole_site,
        "- The same person or record present at several sites: each copy is protected separately, "
        "so their combined exposure is up to the sum of those sites' ε.",
        "- Labels used for evaluation: they are used centrally, only for examples whose owners consented, "
        "and they are not protected by differential privacy.",
        "- Timing: how long a site takes to answer is visible on the network (it is not in the reply).",
        "- The number of records at a site, to within the plan's batch size b: the Poisson sample rate is "
        "1 / ⌈n / b⌉ for n records, so the ε a site reports (and the round it refuses) moves only when adding "
        "or removing a record crosses a multiple of b.",
        "- " + _secure_aggregation_line(secure_aggregation),
    ]


def privacy_statement(
    *,
    sample_level: Sequence[Mapping[str, Any]],
    site_level: Mapping[str, Any] | None = None,
    secure_aggregation: bool | None = None,
    public_pretraining: str | None = None,
) -> str:
    """Plain-language statement.

    ``sample_level``: one entry per site with ``site_id``, ``epsilon`` (None when the site
    recorded no DP training), ``delta`` and ``accountant``. ``site_level``: a server-side
    guarantee for whole sites (``epsilon``, ``delta``, ``mechanism``) or None if there is none.
    ``secure_aggregation``: None when the caller cannot tell (the audit sees only ledgers).
    """
    epsilons = [float(s["epsilon"]) for s in sample_level if s.get("epsilon") is not None]
    worst = f" The weakest protection of any site is ε = {max(epsilons):.3f}." if epsilons else ""
    lines = [
        "## Privacy statement",
        "",
        "**What is guaranteed.** Each site's training examples are protected by sample-level "
        "(ε, δ)-differential privacy, computed separately for every site: whatever one example "
        "contributes, the probability of anything the site ever sent (the encoder weights of every "
        "round and the values below, over all runs and restarts recorded in its ledger) changes by at most a factor e^ε, "
        "except with probability δ. This comes from DP-SGD at the site: Poisson sampling of each "
        "batch, every example's gradient clipped to norm C, Gaussian noise of standard deviation "
        "σ·C added to the sum, composed over all steps the site ever charged." + worst,
        "",
        *(_site_line(site) for site in sample_level),
        "",
        _released_line(),
        "",
        "Guarantees are per site and are not averaged: an example is protected at its own site's ε.",
        "",
        "**Assumptions.**",
        "- Batches are Poisson-subsampled exactly as Opacus implements it, at the recorded sample rate.",
        "- Every example belongs to exactly one site, and a site's data do not change during the run.",
        "- The guarantee is computed and enforced at the site; nothing private relies on the server's "
        "arithmetic (the server only ever sees already-noised weights).",
        f"- {OPACUS_SECURE_RNG_CAVEAT}",
        "- The ledgers are complete: every DP step a site took was recorded before its result left the site "
        "(`fedssl audit` checks signatures, hash chains and the server's per-round record).",
        "",
        *_not_covered(site_level, secure_aggregation),
    ]
    if public_pretraining:
        lines.append(
            f"- Public pretraining data ({public_pretraining}) are not protected: they are assumed public, "
            "and anything the model memorised from them can be revealed."
        )
    return "\n".join(lines) + "\n"
