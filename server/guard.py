"""The coordinator's memory of who each site is and how far its privacy budget has gone.

Two claims in a reply cannot be checked from the reply alone:

- **the site id.** Flower authenticates the *node* (its node key, in a deployment); the site id is
  only a number the node sends. :class:`SiteBindings` binds a site id to the first node that
  answers as it (and a node to its first site id); a later reply that claims another node's site,
  or switches its own, is dropped. Two unbound nodes claiming one site in the same round are both
  dropped and neither is bound: the coordinator cannot tell which is honest.
- **monotone budgets.** A site's ledger only grows and its ε only rises. :class:`SiteWatermarks`
  keeps each site's last accepted (ledger seq, ε) in ``site_watermarks.json`` in the coordinator's
  state dir, across runs: a reply whose ledger seq or ε went backwards (a rolled-back or reset state
  dir, or a replayed reply) is dropped. This is the external witness docs/threat-model.md names for
  a site's silent reset.

Standard library only; the ServerApp's strategies (server/strategy.py) call both from the recorder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedssl.errors import ConfigError
from fedssl.fl.records import SiteReport

WATERMARKS_FILE = "site_watermarks.json"
# ε is a float written by the site's accountant; equal values may differ in the last bits.
EPSILON_BACKWARDS_SLACK = 1e-9


class SiteBindings:
    """site id <-> node id, first seen wins; conflicts in one round bind nobody."""

    def __init__(self) -> None:
        self._node_of_site: dict[int, int] = {}
        self._site_of_node: dict[int, int] = {}

    def problems(self, claims: list[tuple[int, int]]) -> dict[int, str]:
        """For this round's ``(node_id, site_id)`` claims: node id -> why its claim is refused."""
        refused: dict[int, str] = {}
        new: dict[int, list[int]] = {}
        for node, site in claims:
            bound_node, bound_site = self._node_of_site.get(site), self._site_of_node.get(node)
            if bound_node is not None and bound_node != node:
                refused[node] = f"claims site {site}, which node {bound_node} answers as"
            elif bound_site is not None and bound_site != site:
                refused[node] = f"claims site {site}, but this node answered as site {bound_site}"
            elif bound_node is None:
                new.setdefault(site, []).append(node)
        for site, nodes in new.items():
            if len(set(nodes)) > 1:
                for node in nodes:
                    refused[node] = f"site {site} claimed by nodes {sorted(set(nodes))} at once; none is bound"
            else:
                self._node_of_site[site], self._site_of_node[nodes[0]] = nodes[0], site
        return refused


@dataclass
class Watermark:
    ledger_seq: int
    epsilon: float


class SiteWatermarks:
    """Each site's last accepted (ledger seq, ε), on disk when ``path`` is set (else for this process only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._marks: dict[str, Watermark] = self._load()

    def _load(self) -> dict[str, Watermark]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {str(site): Watermark(int(m["ledger_seq"]), float(m["epsilon"])) for site, m in raw["sites"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            # Refuse rather than start over: an empty record would accept any rolled-back site.
            raise ConfigError(f"{self.path}: unreadable coordinator record of site budgets ({err}); restore it from a backup "
                              "(deleting it forgets every site's last ledger seq and epsilon)") from None

    def problem(self, report: SiteReport) -> str | None:
        """Why this report goes backwards against the site's watermark, or None."""
        mark = self._marks.get(str(report.site_id))
        if mark is None:
            return None
        if report.ledger_seq >= 0 and report.ledger_seq <= mark.ledger_seq:
            return f"ledger seq {report.ledger_seq} is not after its last reported seq {mark.ledger_seq} (rolled back or replayed)"
        if math.isfinite(report.epsilon) and report.epsilon < mark.epsilon - EPSILON_BACKWARDS_SLACK:
            return f"epsilon {report.epsilon:.6g} is below its last reported {mark.epsilon:.6g} (budget reset or rolled back)"
        return None

    def advance(self, report: SiteReport) -> None:
        """Record an accepted report (durably, before the round's result is used)."""
        old = self._marks.get(str(report.site_id), Watermark(-1, 0.0))
        epsilon = max(old.epsilon, report.epsilon) if math.isfinite(report.epsilon) else old.epsilon
        new = Watermark(max(old.ledger_seq, report.ledger_seq), epsilon)
        if new == old and str(report.site_id) in self._marks:
            return
        self._marks[str(report.site_id)] = new
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"sites": {site: {"ledger_seq": m.ledger_seq, "epsilon": m.epsilon} for site, m in sorted(self._marks.items())}}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as handle:
            json.dump(body, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
