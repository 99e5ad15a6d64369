# make test  - create .venv if absent, install the package (pip install -e .), check the layers' import
#              contracts (lint-imports), run the test suite
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

.PHONY: install test demo clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e . "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

# The demo: the bundled 24-layer model and its data, offline, on CPU. Each multiple-choice file is
# split into a fixed-seed discovery half (step 1) and held-out half (step 2), as the built-in tasks are.
# Step 1 measures all 128 neurons exactly, named rather than left to --method auto (which times the
# machine), so that every run gives the same files.
DEMO_MODEL := models/mamba-tiny-demo
DEMO_DATA := $(DEMO_MODEL)/demo_data
DEMO_OUT ?= demo_results
DEMO_TASKS := ifeval_format copying counting agreement
comma := ,
empty :=
space := $(empty) $(empty)
DEMO_TASK_FILES := $(subst $(space),$(comma),$(foreach t,$(DEMO_TASKS),$(DEMO_DATA)/$(t).jsonl))
DEMO_COMMON := --model $(DEMO_MODEL) --device cpu --pile_path $(DEMO_DATA)/text.txt --pile_samples 50

# Step 3's IFEval checkers need NLTK's punkt_tab: checked first, so that a missing copy stops the demo
# at once (saying where NLTK looked and how to get it) rather than after steps 1 and 2.
demo: install
	$(PY) -m delta_steering.data.ifeval
	$(PY) step1_neuron_discovery.py $(DEMO_COMMON) --tasks $(DEMO_TASK_FILES) --validation_size 200 --method exact \
	  --save_path $(DEMO_OUT)/discovered_neurons.json --output_dir $(DEMO_OUT)/step1 --overwrite
	$(PY) step2_steering_factor_determination.py $(DEMO_COMMON) \
	  --num_examples 100 --factors 0.5,2,5,10 --neurons_file $(DEMO_OUT)/discovered_neurons.json \
	  --output_dir $(DEMO_OUT)/step2 --max_neurons 16 --perplexity_ablation --perplexity_layers 18-22
	$(PY) step3_steer_performance_verification.py $(DEMO_COMMON) --both \
	  --neurons_file $(DEMO_OUT)/discovered_neurons.json \
	  --factors_file $(DEMO_OUT)/step2/cluster9_ablation_results_all_neurons.json \
	  --ifeval_path $(DEMO_DATA)/ifeval_demo.jsonl --num_samples 30 --max_new_tokens 40 --output_dir $(DEMO_OUT)/step3
	@echo "demo results: $(DEMO_OUT)/ (discovered_neurons.json, step1/, step2/, step3/)"

clean:
	rm -rf $(VENV) .pytest_cache
