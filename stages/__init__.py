"""One module per stage: its config, its output key and its `run` (the interface is written down
in pipeline/registry.py, which maps stage names to these modules)."""
