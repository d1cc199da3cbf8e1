# leapc: `make test` and `make demo` set everything up on a fresh clone by themselves.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: setup test demo lint bench clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk; nothing may pull a newer one.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch .venv/.installed

setup: .venv/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	.venv/bin/leapc demo

lint: setup
	.venv/bin/ruff check .

bench: setup
	$(PY) bench/bench_ar.py

clean:
	rm -rf .venv .cache
