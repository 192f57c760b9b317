# tiflow: `make run` trains the embeddings config.yaml asks for; `make test` runs the tests.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
# torch==2.13.0 from the package index: the CUDA build on Linux x86-64 (several GB), a CPU build on macOS,
# Windows and Linux aarch64. TORCH_INDEX picks another build, e.g. a CPU-only one: README, "Installing torch".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CORES ?= all

BIN := $(VENV)/bin
STAMP := $(VENV)/.tiflow-installed

.PHONY: run test dry-run clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) || { status=$$?; echo; \
	  echo "tiflow: the run stopped (exit status $$status). What stopped it is above; each stage's log is in the logs/ folder of out_dir."; \
	  echo "tiflow: 'make run' again resumes: finished stages are kept, and a stopped training continues from its saved state."; \
	  exit $$status; }

dry-run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) -n

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .snakemake
