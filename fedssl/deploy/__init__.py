"""Real deployment on Flower infrastructure: certificates and keys, SuperLink/SuperNode
process management, the coordinator's server.yaml.

The site side (site.yaml, preflight, status, app pinning) lives in ``fedssl.site_agent``.
"""
