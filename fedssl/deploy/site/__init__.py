"""The site side of a real deployment: what runs at each data holder, next to its data.

A site operator's agent reads the site's own config (site.yaml), checks everything before
the site joins (preflight), reports its privacy budget and ledger (status), pins which app
versions may train on its data, and runs and supervises the Flower SuperNode that connects
the site to the coordinator. The coordinator's twin is :mod:`fedssl.deploy.coordinator`.

Modules:

- ``config``     site.yaml (``SiteConfig``, ``load_site_config``) and ``deployed_site``, the
                 ClientApp's entry in a deployment: data and settings from site.yaml only
- ``pinning``    the app hash and the allowlist check the ClientApp runs before training
- ``events``     the site's own event log (``state_dir/site_events.jsonl``)
- ``status``     the budget and the last ledger rounds, read-only (``fedssl site status``)
- ``preflight``  the checklist before joining (``fedssl site preflight``)
- ``supernode``  the SuperNode launch and supervision, rejoin after a crash (``fedssl site start``)
"""
