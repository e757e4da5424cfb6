# Fresh machine: `make bench` (set up + run the default benchmark), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test bench audits external-audits microbench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints-cpu.txt torch torchvision
	$(BIN)/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev,flower]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/dpfpl bench --fresh

AUDIT_ATTACKS := --attack loss --attack lira --attack rmia --attack canary --attack gradient-canary

audits: setup
	$(BIN)/dpfpl bench --preset audits --fresh
	$(BIN)/dpfpl audit --train --control positive $(AUDIT_ATTACKS) --out results/audits/controls/positive
	$(BIN)/dpfpl audit --train --control negative $(AUDIT_ATTACKS) --out results/audits/controls/negative
	# mechanism + replay audits run inside the preset (bench.audit_hook): runs/*/audit_mechanism/, table_privacy.md

microbench: setup
	mkdir -p results/microbench
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-enable -q --benchmark-sort=name \
		--benchmark-columns=median,iqr,min,rounds --benchmark-json=results/microbench/benchmark.json \
		| tee results/microbench/summary.txt

# CUDA checks, step time and peak memory on a GPU -> results/gpu/ (exit status 2 without CUDA)
gpu-check: setup
	$(BIN)/python -m bench.gpu_check --out results/gpu

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
