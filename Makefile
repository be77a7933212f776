# Two commands a learner needs: `make lab` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: lab test test-browser grade lint bench mutants clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[course,test,hf]"
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

lint: $(STAMP)
	$(BIN)/ruff check .

# The browser tests run every notebook again in JupyterLab (minutes each): make test-browser runs them, make test
# leaves them out.
test: lint
	MINI_DEEPSEEK_QUICK=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not browser" tests

# Every notebook in JupyterLab in headless Chromium (Debian's chromium package); skips cleanly without one.
test-browser: $(STAMP)
	MINI_DEEPSEEK_QUICK=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m browser tests/browser

grade: $(STAMP)
	$(BIN)/python -m tests.exercises.grade

mutants: $(STAMP)
	$(BIN)/python -m tests.mutants

bench: $(STAMP)
	$(BIN)/python -m kernels.bench
	$(BIN)/python benchmarks/decode_vs_hf.py
	$(BIN)/python benchmarks/speculative.py

clean-venv:
	rm -rf $(VENV)
