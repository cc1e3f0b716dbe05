# The README's commands: `make demo` (main job on the embedded default), `make test` (the whole
# suite: what CI runs) and `make check` (its fast tier, for the edit loop). Each creates or
# refreshes .venv idempotently first (re-installed only when pyproject.toml changes).
PYTHON     ?= python3
VENV       ?= .venv
# torch==2.13.0: on this project's machines pip takes the CPU build that lies on disk; elsewhere it
# takes PyPI's normal build of the same release. Override, e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.mlmkit-installed

.PHONY: demo test check slurm bench ablation ablation-scratch ablation-scratch-bert ablation-scratch-roberta clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# On a machine without CUDA, DeepSpeed compiles its shared-memory collective op the first time a
# ZeRO run starts (about 40 s here, cached in ~/.cache/torch_extensions per venv path): built once
# here, with the venv, as DeepSpeed's own pre-build (DS_BUILD_OPS) would, rather than inside the
# first ZeRO launch of the tests.
DS_CPU_OPS := $(VENV)/.deepspeed-cpu-ops
$(DS_CPU_OPS): $(STAMP)
	$(BIN)/python -c "import torch, sys; sys.exit(torch.cuda.is_available())" && \
	    DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
	    || true
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml \
	    recipes/mlm.py --config recipes/configs/demo.yaml $(ARGS)

# Every test: tests/unit (in process) and tests/integration (launched processes, the Slurm
# script on a real Slurm cluster of this machine: tests/slurm_cluster.py), on every core
# (pytest-xdist: a test module is one unit of work; tests/conftest.py says how launches are grouped).
# One worker more than cores for `make test`: launched tests wait (Slurm's time checks, signals,
# checkpoints to appear) and the extra worker keeps the cores busy meanwhile.
XDIST      = -n auto --dist loadscope
XDIST_TEST = -n $(shell echo $$(( $$(nproc) + 1 ))) --dist loadscope
test: $(STAMP) $(DS_CPU_OPS) slurm
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(XDIST_TEST) $(ARGS)

# Slurm and munge for the tests' cluster (Debian's slurm-wlm), installed when slurmctld is missing
# and this is root with apt-get (this project's machines, CI); elsewhere the Slurm tests skip,
# naming the command (under CI=true they fail instead).
SLURM_INSTALL = apt-get install -y slurm-wlm munge
slurm:
	@if ! PATH="$$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Slurm for the tests: $(SLURM_INSTALL)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SLURM_INSTALL) -qq >/dev/null; \
	  else \
	    echo "make: Slurm is not installed and this is not root with apt-get: the Slurm tests" \
	         "skip (install: $(SLURM_INSTALL))"; \
	  fi; \
	fi

# The fast tier for the edit loop: the unit tests (the recipe's single-process runs in process
# included) but the per-architecture sweep; no launched processes.
check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(XDIST) tests/unit -m "not sweep" $(ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/collator.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/throughput.py

ablation: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/ablate_padding.py \
	    --config recipes/configs/ablation_padding.yaml $(ARGS)

# The second ablation regime, both architectures; `make -j2 ablation-scratch` runs them side by
# side (one core each).
ablation-scratch: ablation-scratch-bert ablation-scratch-roberta

SCRATCH_THREADS = $(if $(filter -j%,$(MAKEFLAGS)),1,2)
ablation-scratch-bert ablation-scratch-roberta: ablation-scratch-%: $(STAMP)
	OMP_NUM_THREADS=$(SCRATCH_THREADS) HF_HUB_OFFLINE=1 $(BIN)/python \
	    recipes/ablate_padding.py --config recipes/configs/ablation_scratch_$*.yaml $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache

# The documentation site (docs/, mkdocs.yml) into site/: strict, so a broken link or anchor fails.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/mkdocs build --strict
