"""Run-config keys the simulation driver sets and both apps read (pyproject's [tool.flwr.app.config]),
and the file by which the ServerApp tells the driver that it has finished.

Imports nothing on purpose: the ServerApp imports them without pulling in the training stack.
fedssl/sites.py holds the same two names (a test pins them equal).
"""

from __future__ import annotations

RUN_CONFIG_PATH = "config-path"  # the resolved experiment config (config.yaml in the run dir)
RUN_DIR = "run-dir"

# The ServerApp's last write, into RUN_DIR, once the final encoder is on disk: the run's results are
# complete from the moment it exists (written atomically, so a reader never sees half of it).
SERVER_DONE = "server_done.json"
