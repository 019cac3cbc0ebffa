# `make demo` and `make test` do all set-up on a fresh machine (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; it is installed before the project so that pip never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo test test-slow clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/visor demo --out $(DEMO_DIR)

# pytest exits 5 when it collects no test; make treats every non-zero exit as a failure.
test: $(VENV)/.installed
	$(PY) -m pytest -q

# the minutes-long tests (the full demo and its targets)
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
