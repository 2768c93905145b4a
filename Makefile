# mmoe: every target that needs Python depends on `install` (idempotent, fast when done).
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
# DATA: the synthetic set (generated on first use) or a directory converted by data_scripts/prepare_*.py,
# e.g. `make train DATA=data/myvqa` (stage 0 is skipped when it has no object boxes); TRAIN_ARGS: extra
# LightningCLI flags, e.g. TRAIN_ARGS="--trainer.max_steps=2000".
DATA    ?= data/synthetic
TRAIN_ARGS ?=
# SUMMARY_OUT: where `make train` also writes its summary with date, commit and machine (main_job itself writes
# only <run-dir>/summary.json)
SUMMARY_OUT ?= benchmarks/results/make_train.json
STAMP   := $(VENV)/.installed

.PHONY: install data train test bench bench-gpu study mutation mutation-by-hand clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e ".[dev]"
	# lmms-eval's model API only (its full install pulls datasets, wandb, ...); never touches torch
	$(PYTHON) -m pip install -q --no-deps "lmms_eval==0.7.3" loguru pytz
	touch $(STAMP)

data: install
	@test -f $(DATA)/dataset.json || test -f $(DATA)/tokenizer.json || \
		$(PYTHON) data_scripts/make_synthetic.py --out $(DATA) --seed 0

train: install data
	$(PYTHON) -m mmoe.training.main_job --config configs/default.yaml --data $(DATA) \
		--summary-out $(SUMMARY_OUT) -- $(TRAIN_ARGS)

test: install
	$(PYTHON) -m pytest -q tests

BENCHES := benchmarks/moe_layer.py benchmarks/decode.py benchmarks/model_step.py benchmarks/expert_parallel.py \
           benchmarks/data_loading.py

bench: install data   # data_loading.py reads the synthetic set
	@for f in $(BENCHES); do echo "== $$f"; $(PYTHON) $$f || exit 1; done

# GPU benchmarks + GPU correctness + a bf16-mixed `make train`, each step under its own timeout (issue 23); run on
# the GPU machine with its own python3 (PY=...). Logs and final JSON lines in $(OUT) (summary.jsonl).
# GPU_CHECK_REHEARSE=1 rehearses every step on a CPU at tiny sizes.
OUT ?= runs/gpu_check
bench-gpu:
	OUT=$(OUT) bash benchmarks/gpu_check.sh

# The MoE-versus-dense study (issue 25) on today's two-stage recipe: moe, its dense twin (equal active params),
# flat routing and a dense model of equal total params, 3 seeds each, full test and held-out splits; results in
# benchmarks/results/moe_vs_dense_$(SETTING) (runs resume: finished ones are skipped). SETTING=default|hard
# (hard data is generated into data/synthetic_hard); ACCEL=gpu trains in bf16-mixed, JOBS runs at once.
# About 3 hours on a 2-core CPU (12 VLM runs, 9 stage-0 towers, 24 full evaluations); on a GPU see
# benchmarks/study_gpu.sh (moe vs dense twin, 3 seeds, ~5-6 min on one H200).
SETTING ?= default
ACCEL   ?= cpu
JOBS    ?= 2
STUDY_ARGS ?=
study: install
	$(PYTHON) benchmarks/moe_vs_dense.py --setting $(SETTING) --accelerator $(ACCEL) --jobs $(JOBS) $(STUDY_ARGS)

# Mutation testing (mutmut, configured in pyproject.toml [tool.mutmut]); summary and how to read it: docs/mutation.md.
# MUTATION_SCOPE: mutant-name globs (module paths); mutants/ keeps results, so a rerun only retests what changed.
MUTATION_SCOPE ?= mmoe.model.moe.routing.* mmoe.model.moe.dispatch.* mmoe.model.moe.balancing.* mmoe.metrics.vqa.* mmoe.metrics.gqa_pope.*
MUTATION_JOBS  ?= 2

mutation: install
	nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) $(foreach s,$(MUTATION_SCOPE),'$(s)')
	$(VENV)/bin/mutmut results

# The fallback when mutmut's runner stalls (no verdict for many minutes): the mutants named by MUTANTS (name globs)
# that have no verdict yet, run by hand against the same test selection (or MUTATION_TESTS: test files, for a module
# that every test reaches, such as config.py); verdicts land where `mutmut results` reads.
mutation-by-hand: install
	nice -n 10 $(PYTHON) tools/run_mutants.py --jobs $(MUTATION_JOBS) $(if $(MUTATION_TESTS),--tests $(MUTATION_TESTS)) \
		--pending $(foreach s,$(MUTANTS),'$(s)')

clean:
	rm -rf runs lightning_logs .pytest_cache
