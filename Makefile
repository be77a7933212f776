# Two commands a learner needs: `make lab` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: lab test grade lint bench mutants clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[course,test,hf]"
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	MINI_DEEPSEEK_QUICK=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

grade: $(STAMP)
	$(BIN)/python -m tests.exercises.grade

mutants: $(STAMP)
	$(BIN)/python -m tests.mutants

bench: $(STAMP)
	$(BIN)/python -m kernels.bench
	$(BIN)/python benchmarks/decode_vs_hf.py

clean-venv:
	rm -rf $(VENV)
