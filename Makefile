# Set-up, tests and demo. Everything installs into .venv/ at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on GPU machines install a CUDA build into .venv first and it is kept.
TORCH ?= torch==2.13.0

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Two test processes, each with its own S3 server and Ray cluster, each taking whole files: most
# of the suite's time is spent waiting on processes, stores and retries, not computing.
TEST_PROCESSES ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# What needs no Ray cluster, no S3 server and no process of its own (markers in pyproject.toml).
test-fast: setup
	$(PY) -m pytest -q -m "not cluster and not s3 and not processes"

# A real merge end to end: local S3 server, generated model and adapter, local Ray, verify, load.
demo: setup
	$(PY) -m infra.demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .demo
