"""The built-in shape world: its corpus generator and grammar (``corpus``), its evaluation
benchmark with counterfactuals and caption parser (``benchmark``) and its token kinds
(``token_kinds``). Nothing outside this package knows the shape world: evaluation sees it
through the ``prior.eval.benchmarks.Benchmark`` interface (``conf/benchmark/demo.yaml``).
"""
