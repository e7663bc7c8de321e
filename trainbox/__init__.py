"""The torch-free contract both sides import: the job schema and its YAML loader, errors, atomic file IO,
row models, the stage table, drop-time preflight rules and the stage protocol.

Imports neither ``daemon`` nor ``handlers`` (tests/test_torch_free_daemon.py checks it)."""
