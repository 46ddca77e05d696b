"""The report's plain-language privacy statement, derived from the resolved run config.

Kept in one function so the privacy package can later extend it (e.g. with audit results)
without touching the report layout.
"""

from __future__ import annotations

from typing import Any


def privacy_statement(config: dict[str, Any]) -> str:
    """What the run's differential-privacy guarantee covers, and what it does not."""
    privacy = config.get("privacy", {}) if isinstance(config.get("privacy"), dict) else {}
    if not privacy.get("enabled", True):
        return (
            "**No differential privacy.** This run trained without DP-SGD (`privacy.enabled: false`): "
            "the encoder updates sites sent carry no formal privacy guarantee, and any ε shown is not a bound."
        )
    epsilon = privacy.get("target_epsilon", "?")
    delta = privacy.get("delta", "?")
    clip = privacy.get("max_grad_norm", "?")
    accountant = privacy.get("accountant", "?")
    return "\n\n".join(
        [
            f"**Guarantee.** Each site trains its encoder with DP-SGD (Opacus): every sample's gradient is "
            f"clipped to norm {clip} and Gaussian noise is added, with spend tracked by the {accountant} "
            f"accountant. The result is *sample-level* (ε, δ)-differential privacy *per site*, with target "
            f"ε = {epsilon} and δ = {delta}: for any one sample, everything that site sends over the whole "
            f"run is nearly as likely with or without that sample. Each site's ε is reported separately "
            f"(the largest is the run's worst case; they are never averaged).",
            "**Not covered.** Site-level membership is not protected: whether a site took part, and "
            "properties of a site's data as a whole, may be inferable from its updates. A person who "
            "contributes k samples to a site gets roughly k-fold weaker protection (group privacy). "
            "Metrics a site reports next to its weights (pretext loss, example and step counts) are outside "
            "the DP-SGD bound.",
            "**Labels.** Sites never use labels. Labels are read only centrally, for evaluation, and only "
            "for samples listed as consented in the consent manifest; evaluation accuracies are computed on "
            "those consented samples without differential privacy.",
        ]
    )
