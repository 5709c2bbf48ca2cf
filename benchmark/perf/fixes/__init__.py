"""Before / after measurements of waste the suite removed, each alternated in one process
(BENCHMARKS.md): waste.py (issue 24: LDIFS's reference, the LP-init refit, ZSCL's fp16 teacher
features) and blas.py (issue 32: the scikit-learn probes on one BLAS thread)."""
