"""Real deployment on Flower infrastructure: certificates and keys, SuperLink/SuperNode
process management, the coordinator's server.yaml.

The site side (site.yaml, app pinning, status, preflight, SuperNode supervision) lives in
``fedssl.deploy.site``.
"""
