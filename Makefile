# mmoe: every target that needs Python depends on `install` (idempotent, fast when done).
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
DATA    ?= data/synthetic
STAMP   := $(VENV)/.installed

.PHONY: install data train test bench bench-gpu study clean

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
	@test -f $(DATA)/tokenizer.json || $(PYTHON) data_scripts/make_synthetic.py --out $(DATA) --seed 0

train: install data
	$(PYTHON) -m mmoe.training.main_job --config configs/default.yaml --data $(DATA)

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

# The MoE-versus-dense study: 10 training runs, two at a time (~85 min on 2 CPU cores); results in
# benchmarks/results/moe_vs_dense (runs resume: finished ones are skipped).
study: install data
	$(PYTHON) benchmarks/moe_vs_dense.py --data $(DATA)

clean:
	rm -rf runs lightning_logs .pytest_cache
