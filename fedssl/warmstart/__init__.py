"""Warm start from public data: ``checkpoint`` (server-safe files) and ``pretrain`` (the coordinator's pretraining)."""
