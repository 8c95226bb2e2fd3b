"""Console entry points; each one composes a Hydra config and calls one function."""
