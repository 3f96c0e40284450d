# make venv    .venv with the pinned requirements and mmskip (editable); redone only when
#              requirements.txt or pyproject.toml change
# make report  run the pipeline to reports/all.html and reports/summary.csv, print timings; its jobs start warm
#              (python -m mmskip.worker: torch and transformers imported once, not in each of the 84 jobs)
# make test    the test suite (includes the lint and a small end-to-end run), as two pytest sessions side by side
# make lint    snakemake --lint
# make bench   the skip engine's speed bars (mmskip bench_engine -> results/bench/engine.json; 21 to 45 min)
# make bench-gpu  the GPU bars on a CUDA node (a CUDA build of torch in the venv): OPT-1.3B shape,
#              bf16, batch 1, eager / static / compiled / CUDA-graph decode -> results/bench/engine_gpu.json
# make generate  rewrite the two generated files: the params schema (from src/mmskip/params.py)
#              and dvc.yaml (from the stage table, src/mmskip/stages.py); tests fail while they are stale
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

# The rules call `mmskip`, `snakemake` and `dvc` by name: find them in the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv report test test-shard-1 test-shard-2 lint generate bench bench-gpu

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install -e . --no-deps
	touch $@

report: venv
	$(VENV)/bin/python -m mmskip.worker --threads 1 -- \
		$(VENV)/bin/snakemake --cores all reports/all.html reports/summary.csv
	$(VENV)/bin/mmskip timings --benchmarks benchmarks

# Two pytest sessions side by side, one per core (tests/conftest.py: SECOND_SHARD); each prints when it ends.
test: venv
	@echo "make test: two pytest sessions side by side (--shard 1, --shard 2); each prints its report when it ends"
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-shard-1 test-shard-2

test-shard-1 test-shard-2: test-shard-%: venv
	$(VENV)/bin/pytest -q --shard $* -o cache_dir=.pytest_cache/shard-$*

bench: venv
	$(VENV)/bin/mmskip bench_engine --threads 2 --seed 0 --out results/bench/engine.json

bench-gpu: venv
	$(VENV)/bin/mmskip bench_engine --seed 0 --device cuda --dtype bfloat16 --hidden_size 2048 --num_layers 24 \
		--num_heads 32 --ffn_dim 8192 --batch_sizes 1 --decodes eager static compiled cuda_graph \
		--out results/bench/engine_gpu.json

lint: venv
	$(VENV)/bin/snakemake --lint

generate: venv
	$(VENV)/bin/python -m mmskip.params --out workflow/schemas/params.schema.yaml
	$(VENV)/bin/python -m mmskip.stages --dvc dvc.yaml
