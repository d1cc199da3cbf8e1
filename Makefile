# leapc: `make test` and `make demo` set everything up on a fresh clone by themselves.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: setup test test-fast demo lint bench clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk; nothing may pull a newer one.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch .venv/.installed

setup: .venv/.installed

# The full suite (CI), with the slowest twenty listed. Markers and the rule that sets
# them: tests/conftest.py.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20

# Daily work: no engines of the bundled model or stories260K, no training, sweeps,
# AOTInductor compiles or venv installs. The slowest ten are listed, to see drift.
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow and not aoti and not install" --durations=10

demo: setup
	.venv/bin/leapc demo

lint: setup
	.venv/bin/ruff check .

bench: setup
	$(PY) bench/bench_ar.py

clean:
	rm -rf .venv .cache
