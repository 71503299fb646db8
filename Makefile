# Two entry points, each doing its own set-up on a fresh machine:
#   make audit   -> the release audit on the embedded default (CPU, Triton interpreter)
#   make test    -> the harness tests and the property suite (ci profile)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch 2.13.0 (CPU) is the pinned CPU build; on a GPU machine use its own torch:
#   make test TORCH=torch   (or install the project into an existing environment)
TORCH   ?= torch==2.13.0
JOBS    ?= 2
OUTDIR  ?= report

.PHONY: setup audit test test-gpu goldens-check compile-check clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev,dask]'
	touch $@

setup: $(BIN)/.installed

audit: setup
	TRITON_INTERPRET=1 $(BIN)/lla-verify audit --quick --out $(OUTDIR)

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n $(JOBS) -p no:cacheprovider --hypothesis-profile ci tests properties

test-gpu: setup
	$(BIN)/python -m pytest -n auto --hypothesis-profile gpu tests properties

# every kernel, dtype and head dim compiled to an sm_90 cubin, no GPU needed (minutes)
compile-check: setup
	env -u TRITON_INTERPRET $(BIN)/python -m lla_verify.testing.compile_check --full

goldens-check: setup
	$(BIN)/lla-verify goldens regen --check

clean:
	rm -rf $(VENV) $(OUTDIR) .hypothesis
