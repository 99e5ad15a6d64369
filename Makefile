# make test  - create .venv if absent, install the requirements, run the test suite
# make demo  - run the three steps on the bundled demo model, offline, on CPU

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned so that CPU machines take the local CPU wheel; a CUDA machine may override:
#   make install TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared/data
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export NLTK_DATA ?= $(abspath $(SHARED))/nltk_data

.PHONY: install test clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
