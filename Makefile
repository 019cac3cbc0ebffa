# `make demo` and `make test` do all set-up on a fresh machine (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; it is installed before the project so that pip never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo

LMMS_VENV ?= .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python

.PHONY: demo test test-slow test-lmms clean

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

# the minutes-long tests (the full demo and its targets: every one met but the one README reports missed)
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# lmms-eval in an environment of its own: it needs torchvision, whose PyPI build would replace the CPU
# torch, so the matching pair is installed first and torchvision removed after (lmms-eval's core does
# not import it); filelock 4 breaks lmms-eval 0.7.3's evaluator.
$(LMMS_VENV)/.installed: pyproject.toml
	python3 -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install --quiet --upgrade pip
	$(LMMS_PY) -m pip install --quiet "$(TORCH_SPEC)" torchvision==0.28.0
	$(LMMS_PY) -m pip install --quiet lmms-eval==0.7.3 "filelock<4"
	$(LMMS_PY) -m pip uninstall --yes --quiet torchvision
	$(LMMS_PY) -m pip install --quiet -e '.[dev]'
	touch $@

# lmms-eval's own CLI on the built-in tasks, offline (not part of `make test`)
test-lmms: $(LMMS_VENV)/.installed
	$(LMMS_PY) -m pytest -q -m lmms

clean:
	rm -rf $(VENV) $(LMMS_VENV) runs
