"""Run-config keys the simulation driver sets and both apps read (pyproject's [tool.flwr.app.config]).

Imports nothing on purpose: the ServerApp imports them without pulling in the training stack.
fedssl/sites.py holds the same two names (a test pins them equal).
"""

from __future__ import annotations

RUN_CONFIG_PATH = "config-path"  # the resolved experiment config (config.yaml in the run dir)
RUN_DIR = "run-dir"
