# prost: two commands from a fresh clone.
#   make test   installs everything into .venv and runs the test suite (what CI runs)
#   make demo   installs the runtime and runs the whole pipeline on the embedded mini-world
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL  ?=

.PHONY: test demo bench clean-venv

# A CUDA machine keeps (or gets) a CUDA torch; elsewhere pin the CPU build, which this workplace serves
# from local disk (an unpinned `torch` would pull a multi-GB CUDA build).
$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	  else $(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -r requirements.txt
	$(VENV)/bin/appworld install
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q tests

demo: $(VENV)/.runtime
	$(PY) model.py --model tiny --prompt "Hello" --max-new-tokens 16

bench: $(VENV)/.test
	$(PY) bench.py

clean-venv:
	rm -rf $(VENV)
