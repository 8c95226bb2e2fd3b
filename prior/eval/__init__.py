"""Evaluation: model-agnostic metrics (``prior.eval.metrics``) and benchmark readers that yield
uniform evaluation items (``prior.eval.benchmarks``)."""
