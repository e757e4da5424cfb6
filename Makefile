# Fresh machine: `make bench` (set up + run the default benchmark), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test bench microbench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints-cpu.txt torch torchvision
	$(BIN)/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev,flower]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/dpfpl bench

microbench: setup
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-enable -q

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
