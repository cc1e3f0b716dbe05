# The README's commands: `make demo` (main job on the embedded default), `make test` (the whole
# suite: what CI runs) and `make check` (its fast tier, for the edit loop). Each creates or
# refreshes .venv idempotently first (re-installed only when pyproject.toml or the lock changes),
# with exactly the versions of requirements/lock.txt: the ones the suite was last green with.
PYTHON     ?= python3
VENV       ?= .venv
# torch==2.13.0: on this project's machines pip takes the CPU build that lies on disk; elsewhere it
# takes PyPI's normal build of the same release (CUDA on Linux). Override, e.g.
# TORCH_SPEC="torch==2.14.1". torch is not in the lock: its build differs by machine.
TORCH_SPEC ?= torch==2.13.0
LOCK       := requirements/lock.txt
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.mlmkit-installed
PIP        := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo test test-latest lock check slurm bench ablation ablation-scratch ablation-scratch-bert ablation-scratch-roberta ablation-recipe clean

# LOCKED=1 (the default): torch, then the lock's exact versions, hash-checked and without their
# own dependency resolution (the lock has them all), then mlmkit itself; `pip check` proves the
# set consistent. LOCKED=0 (`make test-latest`): the newest versions pyproject.toml's ranges allow
# (torch held at TORCH_SPEC there too).
LOCKED     ?= 1
ifeq ($(LOCKED),1)
INSTALL = $(PIP) install -q --require-hashes --no-deps -r $(LOCK) && \
          $(PIP) install -q --no-deps -e . && $(PIP) check
else
INSTALL = echo "$(TORCH_SPEC)" > $(VENV)/torch.txt && \
          $(PIP) install -q --upgrade --upgrade-strategy eager -c $(VENV)/torch.txt -e ".[dev]"
endif

# What the tests are told of the install (tests/unit/test_lock.py checks the environment is it).
TEST_ENV = MLMKIT_LOCKED=$(LOCKED) MLMKIT_TORCH_SPEC="$(TORCH_SPEC)" HF_HUB_OFFLINE=1

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(INSTALL)
	touch $(STAMP)

# The suite against the newest versions PyPI serves today, in .venv-latest (reinstalled each
# time): a dependency release that breaks mlmkit fails here, named, before users meet it. Green?
# Then `make lock` takes those versions.
test-latest:
	rm -f .venv-latest/.mlmkit-installed
	$(MAKE) test VENV=.venv-latest LOCKED=0

# Refresh the lock on purpose: the newest versions of every dependency (torch held at
# TORCH_SPEC), with hashes, resolved by pip-tools in a throwaway venv. Run `make test-latest`
# first; commit the new lock with the suite green on it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip pip-tools
	echo "$(TORCH_SPEC)" > .venv-lock/torch.txt
	.venv-lock/bin/pip-compile --quiet --upgrade --extra dev --strip-extras --generate-hashes \
	    --no-emit-index-url --no-emit-find-links --unsafe-package torch \
	    --constraint .venv-lock/torch.txt --output-file $(LOCK) pyproject.toml
	sed -i -e '/^mlmkit @ /,+1d' \
	    -e 's|^#    pip-compile .*|#    make lock   (pip-compile of pyproject.toml[dev], $(TORCH_SPEC) held)|' $(LOCK)
	rm -rf .venv-lock

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
	$(TEST_ENV) $(BIN)/python -m pytest $(XDIST_TEST) $(ARGS)

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
	$(TEST_ENV) $(BIN)/python -m pytest $(XDIST) tests/unit -m "not sweep" $(ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/collator.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/throughput.py

ablation: $(STAMP) probe-data
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/ablate.py \
	    --config recipes/configs/ablation_padding.yaml $(ARGS)

# The second ablation regime, both architectures; `make -j2 ablation-scratch` runs them side by
# side (one core each).
ablation-scratch: ablation-scratch-bert ablation-scratch-roberta

SCRATCH_THREADS = $(if $(filter -j%,$(MAKEFLAGS)),1,2)
ablation-scratch-bert ablation-scratch-roberta: ablation-scratch-%: $(STAMP) probe-data
	OMP_NUM_THREADS=$(SCRATCH_THREADS) HF_HUB_OFFLINE=1 $(BIN)/python \
	    recipes/ablate.py --config recipes/configs/ablation_scratch_$*.yaml $(ARGS)

# The classic recipe against the 2024-26 one (4x256 BERT from scratch); the runs go to
# outputs/ablation_recipe, the report to docs/ablation/recipe.
ablation-recipe: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/ablate.py \
	    --config recipes/configs/ablation_recipe.yaml --report_dir docs/ablation/recipe $(ARGS)

clean:
	rm -rf $(VENV) .venv-latest .venv-lock outputs .pytest_cache site

# The downstream probe's labelled texts (docs/downstream.md) in probes/ (git-ignored): the
# sentiment snippets of the vaderSentiment 3.3.2 source distribution (MIT), fetched by pip into
# .cache/probe-data/ and read from the archive as it is, and the embedded corpus's topic probe.
PROBE_CACHE ?= .cache/probe-data
PROBE_DIR   ?= probes
# The ablations probe a seeded sample of ABLATION_PROBE_EXAMPLES snippets of each set, in
# probes/ablation/ (docs/downstream.md: what a probe costs per eval).
ABLATION_PROBE_EXAMPLES ?= 500
.PHONY: probe-data
probe-data: $(STAMP)
	$(PIP) download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(PROBE_CACHE)
	$(BIN)/python -m mlmkit.data.probe_sets vader \
	    $(PROBE_CACHE)/vaderSentiment-3.3.2.tar.gz $(PROBE_DIR)
	$(BIN)/python -m mlmkit.data.probe_sets vader $(PROBE_CACHE)/vaderSentiment-3.3.2.tar.gz \
	    $(PROBE_DIR)/ablation --max_examples $(ABLATION_PROBE_EXAMPLES)
	$(BIN)/python -m mlmkit.data.probe_sets docs $(PROBE_DIR)

# The trained-head regime (docs/padding-ablation.md): its first phase pre-trains the 4x256 BERT
# on the Lee news corpus, read from gensim 4.4.0's wheel (fetched by pip into .cache/corpora/)
# into corpora/ (git-ignored), once (skipped when its model/ exists); the four padding arms then
# continue from that model on the embedded corpus, 3 seeds; the report goes to
# docs/ablation/trained_head.
CORPUS_CACHE      ?= .cache/corpora
TRAINED_HEAD_BASE := outputs/ablation_trained_head/base
.PHONY: corpora ablation-trained-head
corpora: $(STAMP)
	$(PIP) download -q --no-deps --only-binary :all: gensim==4.4.0 -d $(CORPUS_CACHE)
	$(BIN)/python -m mlmkit.data.corpora lee $(CORPUS_CACHE) corpora

ablation-trained-head: $(STAMP) probe-data corpora
	test -f $(TRAINED_HEAD_BASE)/model/config.json || HF_HUB_OFFLINE=1 $(BIN)/accelerate launch \
	    --config_file accelerate_configs/cpu.yaml recipes/mlm.py \
	    --config recipes/configs/ablation_trained_head_base.yaml
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/ablate.py \
	    --config recipes/configs/ablation_trained_head.yaml \
	    --report_dir docs/ablation/trained_head $(ARGS)

# The committed padding regimes side by side (docs/ablation/regimes.md), from their report.json
# files: run after any of them is rebuilt. LABEL=FOLDER per regime.
REGIMES := "MiniLM-L6 pretrained, new head, 1 epoch=docs/ablation" \
    "BERT 4×256 from scratch, 2 epochs=docs/ablation/scratch/bert" \
    "RoBERTa-style 4×256 from scratch, 2 epochs=docs/ablation/scratch/roberta" \
    "BERT 4×256, trained head, continued 2 epochs=docs/ablation/trained_head"

.PHONY: ablation-regimes
ablation-regimes: $(STAMP)
	$(BIN)/python -m mlmkit.report.across $(REGIMES) --output docs/ablation/regimes.md

# The documentation site (docs/, mkdocs.yml) into site/: strict, so a broken link or anchor fails.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/mkdocs build --strict
