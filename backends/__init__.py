"""tileflow.backends: one kernel backend per folder (reference, triton, ascend)."""
