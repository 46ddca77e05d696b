"""The exceptions fedssl raises for problems a user can fix.

Each message is one line naming the offending field or path and the fix, so the CLI can
print it without a traceback. Config and data errors also subclass ``ValueError`` so code
that only knows the standard library still catches them.
"""

from __future__ import annotations


class FedSSLError(Exception):
    """Base class; ``str(error)`` is a one-line message meant for the user."""


class ConfigError(FedSSLError, ValueError):
    """A configuration value is missing, out of range or inconsistent."""


class DataError(FedSSLError, ValueError):
    """Input data (a file, an array, a manifest) is missing or malformed."""


class PrivacyError(FedSSLError):
    """A privacy guarantee would be violated or cannot be established."""


class RefusedError(PrivacyError):
    """The site refuses to train the round it was asked for; ``rule`` names the setting that refused it.

    The site answers with a refused reply (never with an update trained under less noise)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class BudgetExhaustedError(RefusedError):
    """Another round would spend more privacy budget than the site allows."""

    def __init__(self, message: str, rule: str = "privacy.target_epsilon") -> None:
        super().__init__(message, rule)


class SimulatedDropoutError(FedSSLError):
    """A simulated site fails its round on purpose (``simulation.dropout``), as a crashed site would."""


class ConsentError(FedSSLError):
    """A label was requested for a sample whose owner did not consent to label use."""
