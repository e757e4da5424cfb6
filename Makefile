# Fresh machine: `make bench` (set up + run the default benchmark), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test bench audits tightness external-audits microbench gpu-check gpu-wheels clean

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

# the controls run every membership attack (the audits preset's cells run the sound ones: bench/presets.py)
CONTROL_ATTACKS := --attack loss --attack shadow --attack lira --attack rmia --attack canary --attack whitebox --attack final-cosine

# results/audits: the audits preset (membership + mechanism + replay audits of every cell), the controls,
# the planted-bug zoo
audits: setup
	rm -rf results/audits/controls
	$(BIN)/dpfpl bench --preset audits --fresh
	$(BIN)/dpfpl audit --train --control positive $(CONTROL_ATTACKS) --out results/audits/controls/positive
	$(BIN)/dpfpl audit --train --control negative $(CONTROL_ATTACKS) --out results/audits/controls/negative
	$(BIN)/python -m audits.zoo --trials 20000 --seeds 3 --out results/audits

# sound bound / accounted eps of every method's real mechanism (~4 min on 2 cores)
tightness: setup
	$(BIN)/python -m audits.tightness --preset audits --methods dpfpl dpfpl-nores fedpgp fedotp promptfl \
		fedprompt local --eps 4 2 1 --trials 1000000 --out results/audits/tightness

# results/external: Opacus' and Flower's DP code paths audited with the same mechanism audit (~10 min on
# 2 cores; installs the bench extra for Opacus)
external-audits: setup
	$(BIN)/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[bench]"
	$(BIN)/python -m audits.external --out results/external

# every speed figure (vectorised clients, per-example strategies + Opacus, feature cache, start-up) into
# results/microbench/README.md (~4 min on 2 cores), then the pytest-benchmark micro-timings
# (installs the bench extra: Opacus, for the ours-vs-Opacus rows)
microbench: setup
	$(BIN)/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[bench]"
	mkdir -p results/microbench
	$(BIN)/python -m bench.microbench --out results/microbench
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-enable -q --benchmark-sort=name \
		--benchmark-columns=median,iqr,min,rounds --benchmark-json=results/microbench/benchmark.json \
		| tee results/microbench/summary.txt

# CUDA checks, step time and peak memory on a GPU -> results/gpu/ (exit status 2 without CUDA)
gpu-check: setup
	$(BIN)/python -m bench.gpu_check --out results/gpu

# wheels of what a CUDA machine with torch but no network lacks (open_clip, dp-accounting and their
# small needs; Python 3.12, x86-64) -> .gpu-wheels/; there: sh bench/gpu_offline.sh -- --out results/gpu
GPU_WHEELS = open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 dp-accounting==0.6.0 dm-tree==0.1.10
gpu-wheels:
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .gpu-wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
