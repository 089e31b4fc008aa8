# The README's commands. Python 3.11 + pip (the local torch mirror is only seen by pip).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-all lint bench ui clean

setup:  ## create .venv and install everything (torch first, then the pinned rest)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip check

run:    ## the whole pipeline on the built-in demo (params.yaml)
	$(BIN)/transferops run

test:   ## the CI test suite (fast end-to-end included; slow ones are marked)
	$(BIN)/ruff check src tests bench flows
	$(BIN)/pytest -q -m "not slow"

test-all:
	$(BIN)/pytest -q

bench:
	$(BIN)/python bench/feature_cache.py

ui:     ## MLflow UI + optuna-dashboard on the project's stores (127.0.0.1:5000 and :8080)
	$(BIN)/transferops ui

clean:
	rm -rf data/prepared models/source models/finetuned .pytest_cache
