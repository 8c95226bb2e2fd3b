"""PRIOR: token-weighted next-token prediction for vision-language pre-training."""

__version__ = "0.1.0"
