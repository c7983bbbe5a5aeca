# Both README commands go through scripts/setup.sh, which is idempotent (a no-op once set up).
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test test-slow lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) jobs/make_toy_corpus.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

lint: setup
	$(PY) -m ruff check .
