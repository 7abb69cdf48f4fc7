# prost: two commands from a fresh clone.
#   make test   installs everything into .venv and runs the test suite (what CI runs)
#   make demo   installs the runtime and runs the whole pipeline on the embedded mini-world
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

# `make demo` knobs. MODEL: a name `model.py fetch` knows (downloaded once and converted into models/NAME),
# `tiny` (random init, tokenizer trained on the trajectories: a few-minute smoke run that cannot learn), or
# any HF folder, hub id or .gguf file. The demo trains on every train variant of the mini-world's first
# SCENARIOS scenarios, checks learning on their held-out dev variants, and generalisation on the first
# TEST_SCENARIOS unseen scenarios of test. Every step resumes: the collection skips tasks already in the
# file, training continues a checkpoint, evaluation skips finished tasks.
MODEL          ?= smollm2-135m-instruct
SCENARIOS      ?= 2
TEST_SCENARIOS ?= 1
FETCHABLE      := smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
BASE           := $(if $(filter tiny,$(MODEL)),models/tiny,$(if $(filter $(FETCHABLE),$(MODEL)),models/$(MODEL),$(MODEL)))
# Many cheap optimizer steps suit LoRA on a small pretrained base: lr 2e-3, no adapter dropout (its RNG costs
# more than the adapter's matmuls on a CPU), and per role the smallest micro-batch that keeps the CPU busy
# (a planner sequence holds all of one task's decisions; critic prompts are short). bf16 is native on the
# AVX-512/AMX CPUs we run on. The tiny preset learns from scratch and keeps fp32. --max-seq-len equals
# --max-context, so every role is trained on the prompts it is given at evaluation (data.fit_messages never
# has to cut them). Without --epochs, training lasts until the schedule has reached every sub-task (FINISH
# included), plus one epoch.
TRAIN_FLAGS ?= --max-seq-len 2048 --subtasks-per-epoch 2 --grad-accum 1 --warmup-ratio 0.1 --no-progress \
               $(if $(filter tiny,$(MODEL)),--micro-batch-size 4 --lr 5e-3,--lr 2e-3 --lora-dropout 0 --precision bf16)
PLANNER_FLAGS  ?= $(if $(filter tiny,$(MODEL)),,--micro-batch-size 1 --epochs 6)
EXECUTOR_FLAGS ?= $(if $(filter tiny,$(MODEL)),,--micro-batch-size 2)
CRITIC_FLAGS   ?= $(if $(filter tiny,$(MODEL)),,--micro-batch-size 4 --epochs 5)
# Every training task gets one mistake-and-recovery sub-task from the gold teacher, so the critic sees failures.
COLLECT_FLAGS  ?= --recovery-share 1.0
# BUDGETS admit every task of the mini-world: its gold solutions have at most 8 sub-tasks, and their longest
# reply is under 300 tokens and their longest prompt under 1500 (tests/test_evaluate.py replays them under
# these budgets).
BUDGETS     ?= --max-subtasks 8 --max-executor-turns 3 --max-critic-retries 1 --max-single-turns 12 \
               --max-new-tokens 320 --max-context 2048
SEEDS       ?= 0 1
DEV         := --split dev --scenarios $(SCENARIOS)
TEST        := --split test --scenarios $(TEST_SCENARIOS)
STUDY_EVAL  := $(DEV) --quiet $(BUDGETS)

# `make fetch` downloads and converts a real small model into models/$(FETCH) (see README: Real small models)
FETCH       ?= smollm2-135m-instruct

.PHONY: test test-real fetch demo lr-schedules study bench gpu-check clean-venv

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

# The whole ProST pipeline on the embedded default: world -> gold trajectories -> base model -> one adapter per
# role with the progressive schedule -> rollouts of the untrained base (zero-shot), the trained system and the
# gold replay (the ceiling under the same budgets) on dev (held-out variants) and test (unseen scenarios).
demo: $(VENV)/.runtime
	$(PY) miniworld.py build
	$(PY) agents.py collect --teacher gold --split train --scenarios $(SCENARIOS) $(COLLECT_FLAGS) \
	  --out trajectories/train.jsonl
	$(if $(filter $(FETCHABLE),$(MODEL)),$(PY) model.py fetch $(MODEL))
	$(if $(filter tiny,$(MODEL)),$(PY) data.py texts trajectories/train.jsonl > trajectories/texts.txt)
	$(if $(filter tiny,$(MODEL)),test -f models/tiny/config.json || $(PY) model.py init-tiny --texts trajectories/texts.txt --out models/tiny)
	$(PY) prost.py --model $(BASE) --role planner --data trajectories/train.jsonl --out ckpts/demo --resume \
	  $(TRAIN_FLAGS) $(PLANNER_FLAGS)
	$(PY) prost.py --model $(BASE) --role executor --data trajectories/train.jsonl --out ckpts/demo --resume \
	  $(TRAIN_FLAGS) $(EXECUTOR_FLAGS)
	$(PY) prost.py --model $(BASE) --role critic --data trajectories/train.jsonl --out ckpts/demo --resume \
	  $(TRAIN_FLAGS) $(CRITIC_FLAGS)
	for split in dev test; do \
	  if [ $$split = dev ]; then flags="$(DEV)"; else flags="$(TEST)"; fi; \
	  $(PY) evaluate.py --model $(BASE) --name zero-shot $$flags --out results/demo/$$split/zero-shot --quiet $(BUDGETS) && \
	  $(PY) evaluate.py --agents ckpts/demo --name trained $$flags --out results/demo/$$split/trained $(BUDGETS) && \
	  $(PY) evaluate.py --gold --name gold $$flags --out results/demo/$$split/gold --quiet $(BUDGETS) || exit 1; done
	$(PY) evaluate.py compare results/demo/*/zero-shot/results.json results/demo/*/trained/results.json \
	  results/demo/*/gold/results.json | tee results/demo/table.md

# Which learning-rate schedule the demo should use (README: Our reading of the paper): the demo's roles
# trained again with each --lr-schedule, logging the dev loss per sub-task after every epoch (gold dev
# trajectories), then both systems on dev. Same seed and data as the demo, so the cosine adapters are the
# demo's own.
lr-schedules: demo
	$(PY) agents.py collect --teacher gold $(DEV) --out trajectories/dev.jsonl
	for schedule in cosine per-stage; do \
	  for role in planner executor critic; do \
	    case $$role in planner) flags="$(PLANNER_FLAGS)";; executor) flags="$(EXECUTOR_FLAGS)";; \
	      *) flags="$(CRITIC_FLAGS)";; esac; \
	    $(PY) prost.py --model $(BASE) --role $$role --data trajectories/train.jsonl \
	      --dev-data trajectories/dev.jsonl --lr-schedule $$schedule --out ckpts/lr-schedules/$$schedule \
	      $(TRAIN_FLAGS) $$flags --resume || exit 1; done; \
	  $(PY) evaluate.py --agents ckpts/lr-schedules/$$schedule --name $$schedule \
	    --out results/lr-schedules/$$schedule $(STUDY_EVAL) || exit 1; done
	$(PY) evaluate.py compare results/lr-schedules/*/results.json | tee results/lr-schedules/table.md

# The paper's comparisons at toy scale, on the demo's data and model: untrained vs trained, progressive vs
# full schedule, multi-agent vs single agent, over SEEDS; then the Pareto table (TGC vs FLOPs per task).
study: demo
	$(PY) evaluate.py --model $(BASE) --name untrained-multi --out results/study/untrained-multi $(STUDY_EVAL)
	for seed in $(SEEDS); do \
	  for schedule in progressive full; do \
	    for role in planner executor critic; do \
	      case $$role in planner) flags="$(PLANNER_FLAGS)";; executor) flags="$(EXECUTOR_FLAGS)";; \
	        *) flags="$(CRITIC_FLAGS)";; esac; \
	      $(PY) prost.py --model $(BASE) --role $$role --data trajectories/train.jsonl --schedule $$schedule \
	        --seed $$seed --out ckpts/study/$$schedule-s$$seed $(TRAIN_FLAGS) $$flags --resume || exit 1; done; \
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
