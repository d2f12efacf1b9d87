"""foveate's benchmarks and experiments: each module runs with ``python -m bench.<name>``."""
