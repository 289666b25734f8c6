# The two commands a newcomer needs: `make demo` and `make test`. Both set up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# make setup STACK=spark4: the Spark 4 stack in .venv-spark4 (make test sets up both)
STACK ?= default
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON ?= $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON ?= $(abspath $(PY))
export PYTHONHASHSEED ?= 0

.PHONY: setup demo test test-fast lint dist bench clean

setup:
	@STACK=$(STACK) bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@VENV=$(VENV) bash scripts/test.sh

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

lint: setup
	$(VENV)/bin/ruff check dl_pipeline jobs tests bench notebooks setup.py

dist: setup
	@bash scripts/dist.sh

bench: setup
	$(PY) -m pip install -q -r requirements/bench.txt || echo "bench: fasttext did not install; its reference figure will be null"
	$(PY) bench/accuracy_bench.py
	$(PY) bench/featurize_bench.py
	$(PY) bench/prepare_bench.py
	$(PY) bench/train_bench.py
	$(PY) bench/score_bench.py

clean:
	rm -rf build dist *.egg-info runs spark-warehouse .pytest_cache
