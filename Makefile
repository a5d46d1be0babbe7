# The README's commands. Each sets up what it needs: a fresh machine with only Python 3.11 needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attnzoo-installed
# pytest arguments, e.g. `make test PYTEST_ARGS="-k window -x"`
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-cuda benchmark demo lint clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when the dependency lists change, so a second `make test` installs nothing.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# full-size model forwards, kept out of the default run
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# on a machine with a CUDA GPU: the fused kernels compiled for real, bf16 included
test-cuda: $(STAMP)
	$(PY) -m pytest -m cuda $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(PY) tools/benchmark.py

demo: $(STAMP)
	$(PY) tools/benchmark.py --quick

lint: $(STAMP)
	$(PY) -m ruff check attnzoo tools tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
