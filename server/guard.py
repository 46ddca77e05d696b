"""The coordinator's memory of who each site is (and, via fedssl.privacy.watermarks, how far its budget has gone).

Two claims in a reply cannot be checked from the reply alone:

- **the site id.** Flower authenticates the *node* (its node key, in a deployment); the site id is
  only a number the node sends. :class:`SiteBindings` binds a site id to the first node that
  answers as it (and a node to its first site id); a later reply that claims another node's site,
  or switches its own, is dropped. Two unbound nodes claiming one site in the same round are both
  dropped and neither is bound: the coordinator cannot tell which is honest.
- **monotone budgets.** A site's ledger only grows and its ε only rises.
  :class:`fedssl.privacy.watermarks.SiteWatermarks` keeps each site's last accepted (ledger seq, ε)
  in the coordinator's state dir, across runs: a reply whose ledger seq or ε went backwards (a
  rolled-back or reset state dir, or a replayed reply) is dropped. This is the external witness
  docs/threat-model.md names for a site's silent reset.

The ServerApp's strategies (server/strategy.py) call both from the recorder.
"""

from __future__ import annotations


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
