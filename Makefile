# prost: two commands from a fresh clone.
#   make test   installs everything into .venv and runs the test suite (what CI runs)
#   make demo   installs the runtime and runs the whole pipeline on the embedded mini-world
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

# `make demo` knobs. MODEL empty = the tiny preset (random init, tokenizer trained on the trajectories).
# Every step resumes: the collection skips tasks already in the file, training continues a checkpoint,
# evaluation skips finished tasks.
MODEL       ?=
TRAIN_TASKS ?= 12
EVAL_TASKS  ?= 12
# BUDGETS admit every task of the mini-world: its gold solutions have at most 8 sub-tasks, and with the tiny
# preset's tokenizer their longest reply is under 300 tokens and their longest prompt under 1500
# (tests/test_evaluate.py replays them under these budgets). --max-seq-len equals --max-context, so every
# role is trained on the prompts it is given at evaluation (data.fit_messages never has to cut them). Without
# --epochs, training lasts until the schedule has reached every sub-task (FINISH included), plus one epoch.
TRAIN_FLAGS ?= --max-seq-len 2048 --subtasks-per-epoch 2 --micro-batch-size 4 --grad-accum 1 \
               --lr 5e-3 --warmup-ratio 0.1 --no-progress
BUDGETS     ?= --max-subtasks 8 --max-executor-turns 3 --max-critic-retries 1 --max-single-turns 12 \
               --max-new-tokens 320 --max-context 2048
SEEDS       ?= 0 1
STUDY_EVAL  := --split dev --limit $(EVAL_TASKS) --quiet $(BUDGETS)
BASE        := $(if $(MODEL),$(MODEL),models/tiny)

# `make fetch` downloads and converts a real small model into models/$(FETCH) (see README: Real small models)
FETCH       ?= smollm2-135m-instruct

.PHONY: test test-real fetch demo study bench gpu-check clean-venv

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

# Real pretrained weights (downloads SmolLM2-135M-Instruct once, 93 MB): prost against transformers on them.
test-real: $(VENV)/.test
	$(PY) model.py fetch smollm2-135m-instruct
	$(PY) -m pytest -q tests_real

fetch: $(VENV)/.runtime
	$(PY) model.py fetch $(FETCH)

# The whole ProST pipeline on the embedded default: world -> gold trajectories -> (tiny model) -> one adapter
# per role with the progressive schedule -> rollouts on dev (held-out variants) and test (unseen scenarios).
demo: $(VENV)/.runtime
	$(PY) miniworld.py build
	$(PY) agents.py collect --teacher gold --split train --limit $(TRAIN_TASKS) --out trajectories/train.jsonl
	$(if $(MODEL),,$(PY) data.py texts trajectories/train.jsonl > trajectories/texts.txt)
	$(if $(MODEL),,test -f models/tiny/config.json || $(PY) model.py init-tiny --texts trajectories/texts.txt --out models/tiny)
	for role in planner executor critic; do \
	  $(PY) prost.py --model $(BASE) --role $$role --data trajectories/train.jsonl --out ckpts/demo \
	    $(TRAIN_FLAGS) --resume || exit 1; done
	$(PY) evaluate.py --agents ckpts/demo --split dev --limit $(EVAL_TASKS) --out results/demo-dev $(BUDGETS)
	$(PY) evaluate.py --agents ckpts/demo --split test --limit $(EVAL_TASKS) --out results/demo-test $(BUDGETS)
	cat results/demo-dev/report.md results/demo-test/report.md

# The paper's comparisons at toy scale, on the demo's data and model: untrained vs trained, progressive vs
# full schedule, multi-agent vs single agent, over SEEDS; then the Pareto table (TGC vs FLOPs per task).
study: demo
	$(PY) evaluate.py --model $(BASE) --name untrained-multi --out results/study/untrained-multi $(STUDY_EVAL)
	for seed in $(SEEDS); do \
	  for schedule in progressive full; do \
	    for role in planner executor critic; do \
	      $(PY) prost.py --model $(BASE) --role $$role --data trajectories/train.jsonl --schedule $$schedule \
	        --seed $$seed --out ckpts/study/$$schedule-s$$seed $(TRAIN_FLAGS) --resume || exit 1; done; \
	    $(PY) evaluate.py --agents ckpts/study/$$schedule-s$$seed --name multi-$$schedule-s$$seed \
	      --out results/study/multi-$$schedule-s$$seed $(STUDY_EVAL) || exit 1; done; \
	  $(PY) prost.py --model $(BASE) --role single --data trajectories/train.jsonl --seed $$seed \
	    --out ckpts/study/single-s$$seed $(TRAIN_FLAGS) --resume || exit 1; \
	  $(PY) evaluate.py --single ckpts/study/single-s$$seed/single --name single-progressive-s$$seed \
	    --out results/study/single-progressive-s$$seed $(STUDY_EVAL) || exit 1; done
	$(PY) evaluate.py pareto results/study/*/results.json

bench: $(VENV)/.test
	$(PY) bench.py

# Every CUDA path of prost at real shapes, one table, a few minutes (gpu_check.py); one line and exit 0 without
# CUDA. No install step: the lent GPU machines have torch and transformers system-wide, no network and no
# .venv, so this uses .venv's python when there is one and $(PYTHON) otherwise.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) gpu_check.py

clean-venv:
	rm -rf $(VENV)
