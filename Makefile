# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install the project and the offline data it needs, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cfbench-installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
# two workers, each test file on one of them (module fixtures are built once); a single thread each;
# files handed out in collection order (tests/conftest.py puts the longest first), not xdist's
# default of the files with the most tests first
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder
# Packages read only for their data files (clip-benchmark: class names and prompt templates;
# foolbox: 20 sample images per dataset). Installed without their dependencies, which cfbench
# never imports (clip-benchmark alone would pull transformers and pycocoevalcap).
DATA_PKGS := clip-benchmark==1.6.2 foolbox==3.3.4

.PHONY: demo test gpu-check setup system-data clean-results

demo: setup
	$(PY) -m benchmark run

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything GPU-specific in one call (BENCHMARKS.md): results/gpu-check/gpu-check.{json,md}
gpu-check: setup
	$(PY) -m benchmark.perf.gpu_check --out results/gpu-check

setup: $(STAMP) system-data

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q --no-compile -e '.[test]'
	$(PY) -m pip install -q --no-compile --no-deps $(DATA_PKGS)
	@# bytecode for every installed module, on every core (pip compiles one file at a time: 108 s -> 83 s
	@# for the whole set-up here); without it each process would compile what it imports (2x slower start).
	@# Not the packages' own test suites or pip, which no cfbench process imports (3,800 of 20,800 files;
	@# compileall 43-46 s -> 25-35 s, 3 pairs on a busy machine); setuptools is imported (GPUtil, under
	@# Avalanche, imports distutils), so it keeps its bytecode
	$(PY) -m compileall -q -j 0 -x '/tests?/|/site-packages/pip/' $(VENV)/lib > /dev/null || true
	@touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (real idx files).
system-data:
	@if [ -d $(FASHION_DIR) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "notice: could not install dataset-fashion-mnist; the demo runs without Fashion-MNIST"; \
	else echo "notice: Fashion-MNIST (Debian package dataset-fashion-mnist) is missing and this is not root; the demo runs without it"; fi

clean-results:
	rm -rf results/*/
