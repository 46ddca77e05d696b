# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs, runs the digits DP-SSL federation, writes runs/digits-demo/report.md
#   make test   -> same set-up, runs the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# Parallel test workers: the slow tests mostly wait on Flower processes (polls, timeouts, start-up), so
# three workers on two cores finish sooner than two (10.4 vs 13.4 min for the suite in two runs on this
# 2-core machine, each beside other work, so a rough ratio). Four did not beat three on 2026-12-06 (pytest
# 20.2 vs 19.5 min on clean clones; again on 2026-12-07, 15.1 vs 15.4 min): the longest test files set the pace. `make test TEST_WORKERS=0` runs
# them serially.
TEST_WORKERS ?= 3
# --no-loadscope-reorder keeps tests/slow_order.py's order (modules with real-process tests first, longest first). By default
# pytest-xdist reorders files by their number of tests, which hands the one-test, minutes-long real-process
# files out last: on 2026-12-07 the CI's final minutes were those files alone on a few workers.
# The dashboard's browser tests drive Debian's chromium through Playwright (no browser download at run time).
# CI runs as root on a fresh Debian machine: `setup` installs it once; present, it is left alone.
CHROMIUM ?= /usr/bin/chromium
# One torch/OpenMP thread per test process: three workers plus the Flower processes they start share two
# cores, and OpenMP's spinning threads then fight each other (a CPU-bound test: 18 s with one thread against
# 37-46 s with two, paired runs at load 5). Tests that need more threads set them themselves.
TEST_THREADS := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

.PHONY: setup demo test test-quick bench audit-demo clean

# The venv (pip) and chromium (apt) install side by side: on a fresh machine each takes about two minutes.
setup:
	@$(MAKE) --no-print-directory -j2 $(VENV)/.installed $(CHROMIUM)

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
# pip byte-compiles the installed files one at a time; compileall writes the same .pyc files on every core
# (pip's 309 s against 147 + 92 s, installs of this venv side by side with other work on the 2-core machine).
# The .pyc files must be written here: where PYTHONDONTWRITEBYTECODE is set (as in this workplace's shells),
# imports never write them, and every test process would compile torch's modules again.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check --no-compile -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $@

demo: setup
	$(BIN)/fedssl simulate configs/experiments/digits-demo.yaml --overwrite
	@echo "make demo: one run is one draw of the sites' DP noise; this config over 6 runs: README.md, 'What it shows, over 6 runs' (python benchmarks/demo_repeats.py); on Fashion-MNIST: benchmarks/README.md section 10"

# pytest exits 5 when a filtered subset collects no tests: not a failure.
test: setup
	$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(PYTEST_ARGS); code=$$?; [ $$code -eq 5 ] && exit 0; exit $$code

test-quick: setup
	$(TEST_THREADS) $(BIN)/python -m pytest -q -m 'not slow' $(PYTEST_ARGS); code=$$?; [ $$code -eq 5 ] && exit 0; exit $$code

bench: setup
	$(BIN)/python benchmarks/run_all.py --quick

audit-demo: setup
	$(BIN)/fedssl audit runs/digits-demo

clean:
	rm -rf $(VENV) runs .pytest_cache
