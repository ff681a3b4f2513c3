"""One module per CLI command (see kcengine.cli)."""
