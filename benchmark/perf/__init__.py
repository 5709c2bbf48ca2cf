"""The perf room: speed measured as ratios in one run (BENCHMARKS.md). The suite against a bare
PyTorch loop (bench.py: `cfbench perf`), the raw vs compact cache (cache.py, also
`python -m benchmark.perf_cache`; no Avalanche needed), the sweep's overhead (sweep.py), and a
protocol's wall time projected from measured rates, beside the official code's path
(projection.py, rates.py, official.py: `cfbench perf --projection`), and the before / after of
removed waste (fixes/: `python -m benchmark.perf.fixes.waste`, `... .fixes.blas`), and everything
GPU-specific in one call (gpu_check.py: `make gpu-check`). Nothing here is imported by a run."""
