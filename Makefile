# Both README commands go through scripts/setup.sh, which is idempotent (a no-op once set up).
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled
TOY_CORPUS := outputs/toy_corpus/corpus.json
TOY_IDM := outputs/models/toy_idm/config.json
TOY_WM := outputs/models/toy_token_world_model/config.json

.PHONY: setup demo test test-faults lint toy-models serve bench

setup:
	@bash scripts/setup.sh

# The main job on the embedded default: annotate the toy corpus with the toy IDM (each built once), then
# check the kept actions against the toy world (the IDM's own test accuracy prints when it is trained).
demo: setup $(TOY_CORPUS) $(TOY_IDM)
	$(PY) jobs/annotate.py
	$(PY) jobs/evaluate_idm.py bench=null triplets=outputs/annotated/triplets output=outputs/annotated/eval_idm

$(TOY_CORPUS): | setup
	$(PY) jobs/make_toy_corpus.py

$(TOY_IDM): $(TOY_CORPUS) | setup
	$(PY) jobs/train_idm.py
	$(PY) jobs/evaluate_idm.py

# The token world model (the paper's kind, and the toy that learns the toy world: tests/test_toy_training.py holds
# it to >= 5/10 on the toy judge), which configs/serve.yaml serves; `$(PY) jobs/train_world_model.py` trains the
# diffusion toy instead (docs/experiments.md compares them).
$(TOY_WM): $(TOY_CORPUS) | setup
	$(PY) jobs/train_world_model.py --config configs/train_token_world_model.yaml

toy-models: $(TOY_IDM) $(TOY_WM)

# The best-of-N service on the toy models (Ctrl-C stops it): http://127.0.0.1:8000/
serve: toy-models
	.venv/bin/serve run configs/serve.yaml

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-faults: setup
	$(PY) -m pytest -m fault

lint: setup
	$(PY) -m ruff check .

# Speed benchmarks (issue 9): each prints one JSON line per figure (ratios against a baseline measured in the
# same run), also appended to bench/results.jsonl. p1_annotation.py prints P1 and P7 from one run, with an IDM
# of a real family sized to cost about 3x decoding per pair (issue 22); p5_decode.py prints P5 at the toy balance.
# decode_cpu.py: one core's CPU per pair for decode + motion + store at 224 px; idm_throughput.py: the IDM's
# label path against plain generate, tokens/s (issue 32).
# All seven figures, P2 for both world-model backends, and finalize at 1M rows; P6 (jobs/reproduce.py end to end, its three regimes) takes over an hour: BENCH_P6=0 skips it.
bench: setup
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/p1_annotation.py
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/p5_decode.py
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/decode_cpu.py
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/idm_throughput.py
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/p2_best_of_n.py
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/p2_best_of_n.py backend=token
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/finalize_scale.py
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/p3_serving.py
	BENCH_RESULTS=bench/results.jsonl $(PY) bench/p4_training.py
	@if [ "$(BENCH_P6)" != "0" ]; then BENCH_RESULTS=bench/results.jsonl $(PY) bench/p6_toy_loop.py; \
	else echo "P6 skipped (BENCH_P6=0)"; fi
