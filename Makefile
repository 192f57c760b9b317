# tiflow: `make run` trains the embeddings config.yaml asks for; `make test` runs the tests.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch by default. GPU users: see README ("Installing with a GPU").
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
	$(BIN)/snakemake --cores $(CORES)

dry-run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) -n

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .snakemake
