"""tileflow.passes: one graph pass per module (see tileflow.pipeline)."""
