# prost: two commands from a fresh clone.
#   make test   installs everything into .venv and runs the test suite (what CI runs)
#   make demo   installs the runtime and runs the whole pipeline on the embedded mini-world
# bash with pipefail: a table piped through tee fails the target when the command that writes it fails.
SHELL       := bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

# `make demo` knobs. MODEL: a name `model_io.py fetch` knows (downloaded once and converted into models/NAME),
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
TRAIN_FLAGS ?= --max-seq-len 2048 --subtasks-per-epoch 2 --grad-accum 1 --warmup-ratio 0.1 \
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
DEV         := --split dev --scenarios $(SCENARIOS)
TEST        := --split test --scenarios $(TEST_SCENARIOS)

# `make study` knobs (README: The study). The multi-agent system is trained with each schedule for every seed
# of STUDY_SEEDS (the first seed also logs its dev loss per sub-task: the learning curves); the single agent,
# with each schedule, and the heterogeneous systems on LARGE, for the first seed. STUDY=quick: one seed, dev
# only, no LARGE model.
STUDY        ?= full
STUDY_SEEDS  ?= $(if $(filter quick,$(STUDY)),0,0 1 2)
STUDY_SPLITS ?= $(if $(filter quick,$(STUDY)),dev,dev test)
LARGE        ?= $(if $(filter quick,$(STUDY))$(filter tiny,$(MODEL)),,qwen2.5-coder-0.5b-instruct)
SINGLE_FLAGS ?= $(if $(filter tiny,$(MODEL)),,--micro-batch-size 1 --epochs 6)
SEED0        := $(firstword $(STUDY_SEEDS))
# Shell snippets for the recipes: each role's flags ($$role -> $$flags), each split's (-> $$split_flags).
ROLE_FLAGS   = case $$role in planner) flags="$(PLANNER_FLAGS)";; executor) flags="$(EXECUTOR_FLAGS)";; \
                 critic) flags="$(CRITIC_FLAGS)";; *) flags="$(SINGLE_FLAGS)";; esac
SPLIT_FLAGS  = if [ $$split = dev ]; then split_flags="$(DEV)"; else split_flags="$(TEST)"; fi

# `make fetch` downloads and converts a real small model into models/$(FETCH) (see README: Real small models)
FETCH       ?= smollm2-135m-instruct

.PHONY: test test-real fetch demo world world-study lr-schedules study bench gpu-check clean-venv

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

$(VENV)/.study: $(VENV)/.runtime requirements-study.txt
	$(PIP) install -q -r requirements-study.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q tests

# Real pretrained weights (downloads SmolLM2-135M-Instruct once, 93 MB): prost against transformers on them.
test-real: $(VENV)/.test
	$(PY) model_io.py fetch smollm2-135m-instruct
	$(PY) -m pytest -q tests_real

fetch: $(VENV)/.runtime
	$(PY) model_io.py fetch $(FETCH)

# The whole ProST pipeline on the embedded default: world -> gold trajectories -> base model -> one adapter per
# role with the progressive schedule -> rollouts of the untrained base (zero-shot), the trained system and the
# gold replay (the ceiling under the same budgets) on dev (held-out variants) and test (unseen scenarios).
demo: $(VENV)/.runtime
	$(PY) miniworld.py build
	$(PY) rollout.py collect --teacher gold --split train --scenarios $(SCENARIOS) $(COLLECT_FLAGS) \
	  --out trajectories/train.jsonl
	$(if $(filter $(FETCHABLE),$(MODEL)),$(PY) model_io.py fetch $(MODEL))
	$(if $(filter tiny,$(MODEL)),$(PY) data.py texts trajectories/train.jsonl > trajectories/texts.txt)
	$(if $(filter tiny,$(MODEL)),test -f models/tiny/config.json || $(PY) model_io.py init-tiny --texts trajectories/texts.txt --out models/tiny)
	$(PY) prost.py --model $(BASE) --role planner --data trajectories/train.jsonl --out ckpts/demo --resume \
	  $(TRAIN_FLAGS) $(PLANNER_FLAGS)
	$(PY) prost.py --model $(BASE) --role executor --data trajectories/train.jsonl --out ckpts/demo --resume \
	  $(TRAIN_FLAGS) $(EXECUTOR_FLAGS)
	$(PY) prost.py --model $(BASE) --role critic --data trajectories/train.jsonl --out ckpts/demo --resume \
	  $(TRAIN_FLAGS) $(CRITIC_FLAGS)
	for split in dev test; do $(SPLIT_FLAGS); \
	  $(PY) evaluate.py --model $(BASE) --name zero-shot $$split_flags --out results/demo/$$split/zero-shot --quiet $(BUDGETS) && \
	  $(PY) evaluate.py --agents ckpts/demo --name trained $$split_flags --out results/demo/$$split/trained $(BUDGETS) && \
	  $(PY) evaluate.py --gold --name gold $$split_flags --out results/demo/$$split/gold --quiet $(BUDGETS) || exit 1; done
	$(PY) evaluate.py compare results/demo/*/zero-shot/results.json results/demo/*/trained/results.json \
	  results/demo/*/gold/results.json | tee results/demo/table.md

# The demo's recipe on the whole mini-world (README: The whole mini-world): every training scenario's tasks, then
# the trained system and the gold replay on every dev and test task, WORKERS tasks in flight (their model calls
# decode together, batch-invariantly), and the per-scenario table. Test first: its unseen scenarios are the question
# the run answers. Resumes like the demo; its own files. The study at this scale is a set of such runs (below):
# SCHEDULE=full trains with the standard schedule instead (same epochs), KIND=single trains and evaluates the single
# agent, SEED=N another seed. A run KIND:SCHEDULE:SEED names its folders after what it changes from the first run,
# and its system as study.py groups them (multi:full:1: ckpts/world-full-s1, results/world-full-s1, multi-full-s1).
WORKERS  ?= 16
SCHEDULE ?= progressive
KIND     ?= multi
SEED     ?= 0
seed_tag     = $(if $(filter 0,$(1)),,-s$(1))
run_kind     = $(word 1,$(subst :, ,$(1)))
run_schedule = $(word 2,$(subst :, ,$(1)))
run_seed     = $(word 3,$(subst :, ,$(1)))
single_tag   = $(if $(filter single,$(call run_kind,$(1))),-single)
full_tag     = $(if $(filter full,$(call run_schedule,$(1))),-full)
run_dir      = world$(call single_tag,$(1))$(call full_tag,$(1))$(call seed_tag,$(call run_seed,$(1)))
run_name     = $(call run_kind,$(1))-$(call run_schedule,$(1))-s$(call run_seed,$(1))
WORLD    := $(call run_dir,$(KIND):$(SCHEDULE):$(SEED))
TRAINED  := $(call run_name,$(KIND):$(SCHEDULE):$(SEED))
WORLD_ROLES  := $(if $(filter single,$(KIND)),single,planner executor critic)
WORLD_SYSTEM := $(if $(filter single,$(KIND)),--single ckpts/$(WORLD)/single,--agents ckpts/$(WORLD))
world: $(VENV)/.runtime
	$(PY) miniworld.py build
	$(PY) rollout.py collect --teacher gold --split train $(COLLECT_FLAGS) --out trajectories/world-train.jsonl
	$(if $(filter $(FETCHABLE),$(MODEL)),$(PY) model_io.py fetch $(MODEL))
	$(if $(filter tiny,$(MODEL)),$(PY) data.py texts trajectories/world-train.jsonl > trajectories/world-texts.txt)
	$(if $(filter tiny,$(MODEL)),test -f models/tiny/config.json || \
	  $(PY) model_io.py init-tiny --texts trajectories/world-texts.txt --out models/tiny)
	for role in $(WORLD_ROLES); do $(ROLE_FLAGS); \
	  $(PY) prost.py --model $(BASE) --role $$role --data trajectories/world-train.jsonl --out ckpts/$(WORLD) \
	    --schedule $(SCHEDULE) --seed $(SEED) --resume $(TRAIN_FLAGS) $$flags || exit 1; done
	for split in test dev; do \
	  $(PY) evaluate.py $(WORLD_SYSTEM) --name $(TRAINED) --split $$split --out results/$(WORLD)/$$split/trained \
	    --workers $(WORKERS) $(BUDGETS) && \
	  $(PY) evaluate.py --gold --name gold --split $$split --out results/$(WORLD)/$$split/gold --quiet $(BUDGETS) \
	    || exit 1; done
	$(PY) evaluate.py compare results/$(WORLD)/*/trained/results.json results/$(WORLD)/*/gold/results.json \
	  | tee results/$(WORLD)/table.md
	$(PY) evaluate.py scenarios results/$(WORLD)/*/trained/results.json results/$(WORLD)/*/gold/results.json \
	  | tee results/$(WORLD)/scenarios.md

# The study at the whole mini-world's scale (docs/results.md): `make world` for each seed of WORLD_SEEDS with each
# schedule, and the single agent on the first seed, then study.py's report over them (systems and Pareto front
# per split, progressive against standard per seed and paired per task, sub-task error rates, time), from links
# in results/world-study and ckpts/world-study. Each run resumes; a run takes about 5-6 hours on 2 CPU cores.
WORLD_SEEDS ?= 0 1 2
WORLD_RUNS   = $(foreach s,$(WORLD_SEEDS),multi:progressive:$(s) multi:full:$(s)) \
               single:progressive:$(firstword $(WORLD_SEEDS))
world-study: $(VENV)/.runtime $(VENV)/.study
	$(foreach r,$(WORLD_RUNS),$(MAKE) world KIND=$(call run_kind,$(r)) SCHEDULE=$(call run_schedule,$(r)) \
	  SEED=$(call run_seed,$(r)) && ) true
	mkdir -p results/world-study/dev results/world-study/test ckpts/world-study
	$(foreach r,$(WORLD_RUNS),ln -sfn ../$(call run_dir,$(r)) ckpts/world-study/$(call run_name,$(r)) && \
	  $(foreach split,dev test,ln -sfn ../../$(call run_dir,$(r))/$(split)/trained \
	    results/world-study/$(split)/$(call run_name,$(r)) && )) true
	$(PY) study.py results/world-study --ckpts ckpts/world-study

# Which learning-rate schedule the demo should use (README: Our reading of the paper): the demo's roles
# trained again with each --lr-schedule, logging the dev loss per sub-task after every epoch (gold dev
# trajectories), then both systems on dev. Same seed and data as the demo, so the cosine adapters are the
# demo's own.
lr-schedules: demo
	$(PY) rollout.py collect --teacher gold $(DEV) --out trajectories/dev.jsonl
	for schedule in cosine cosine-restarts; do \
	  for role in planner executor critic; do $(ROLE_FLAGS); \
	    $(PY) prost.py --model $(BASE) --role $$role --data trajectories/train.jsonl \
	      --dev-data trajectories/dev.jsonl --lr-schedule $$schedule --out ckpts/lr-schedules/$$schedule \
	      $(TRAIN_FLAGS) $$flags --resume || exit 1; done; \
	  $(PY) evaluate.py --agents ckpts/lr-schedules/$$schedule --name $$schedule \
	    --out results/lr-schedules/$$schedule $(DEV) --quiet $(BUDGETS) || exit 1; done
	$(PY) evaluate.py compare results/lr-schedules/*/results.json | tee results/lr-schedules/table.md

# The paper's comparisons at small scale (README: The study), on the demo's data and base model: the untrained
# base, multi-agent and single agent, each trained with the progressive and the standard (full) schedule for
# the same epochs, and on LARGE the heterogeneous system (a LARGE planner with the first seed's progressive
# executor and critic) and the single agent. Every step resumes; study.py then writes results/study/study.md.
study: demo $(VENV)/.study
	$(PY) rollout.py collect --teacher gold $(DEV) --out trajectories/dev.jsonl
	$(if $(LARGE),$(PY) model_io.py fetch $(LARGE))
	for seed in $(STUDY_SEEDS); do \
	  if [ $$seed = $(SEED0) ]; then systems="multi single"; dev="--dev-data trajectories/dev.jsonl"; \
	    else systems=multi; dev=""; fi; \
	  for system in $$systems; do for schedule in progressive full; do \
	    if [ $$system = multi ]; then roles="planner executor critic"; else roles=single; fi; \
	    for role in $$roles; do $(ROLE_FLAGS); \
	      $(PY) prost.py --model $(BASE) --role $$role --data trajectories/train.jsonl $$dev --schedule $$schedule \
	        --seed $$seed --out ckpts/study/$$system-$$schedule-s$$seed $(TRAIN_FLAGS) $$flags --resume || exit 1; \
	    done; done; done; done
	$(if $(LARGE),for role in planner single; do $(ROLE_FLAGS); \
	  if [ $$role = planner ]; then out=hetero-progressive-s$(SEED0); else out=single-large-progressive-s$(SEED0); fi; \
	  $(PY) prost.py --model models/$(LARGE) --role $$role --data trajectories/train.jsonl --seed $(SEED0) \
	    --out ckpts/study/$$out $(TRAIN_FLAGS) $$flags --resume || exit 1; done; \
	  for role in executor critic; do \
	    ln -sfn ../multi-progressive-s$(SEED0)/$$role ckpts/study/hetero-progressive-s$(SEED0)/$$role; done)
	for split in $(STUDY_SPLITS); do $(SPLIT_FLAGS); \
	  for run in untrained-multi untrained-single $(foreach s,$(STUDY_SEEDS),multi-progressive-s$(s) multi-full-s$(s)) \
	      single-progressive-s$(SEED0) single-full-s$(SEED0) \
	      $(if $(LARGE),hetero-progressive-s$(SEED0) single-large-progressive-s$(SEED0)); do \
	    case $$run in untrained-multi) system="--model $(BASE)";; untrained-single) system="--model $(BASE) --kind single";; \
	      single-*) system="--single ckpts/study/$$run/single";; *) system="--agents ckpts/study/$$run";; esac; \
	    $(PY) evaluate.py $$system --name $$run $$split_flags --out results/study/$$split/$$run --quiet $(BUDGETS) \
	      || exit 1; done; done
	$(PY) study.py results/study --ckpts ckpts/study

bench: $(VENV)/.test
	$(PY) bench.py

# Every CUDA path of prost at real shapes, one table, a few minutes (gpu_check.py); one line and exit 0 without
# CUDA. No install step: the lent GPU machines have torch and transformers system-wide, no network and no
# .venv, so this uses .venv's python when there is one and $(PYTHON) otherwise.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) gpu_check.py

clean-venv:
	rm -rf $(VENV)
