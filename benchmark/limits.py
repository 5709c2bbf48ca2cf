"""Bounds every number cfbench takes shares, from a config key or a flag: integers fit a C int
(torch, numpy and the CUDA kernels take them as such), and a thread count stays sane."""

INT_MAX = 2 ** 31 - 1
THREADS_MAX = 4096
