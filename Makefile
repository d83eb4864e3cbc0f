# One command sets up and runs the tests; one sets up and runs the demo build.
# Both build a virtual environment from nothing (and PostgreSQL server binaries
# when the machine lacks them, since the contract tests need a real server).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test check demo venv postgres nginx bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

postgres:
	@bash scripts/ensure-postgres.sh

# nginx for the deployment example's test (tests/integration/test_deploy_nginx.py).
nginx:
	@bash scripts/ensure-nginx.sh

check: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src/herder

test: $(STAMP) postgres nginx check
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	rm -rf build/demo
	$(PY) examples/sum-of-squares/generate.py 10 build/demo
	$(VENV)/bin/herder run --chdir build/demo build/demo/Rakefile

# Benchmarks: herder beside its baselines, each measured in the same run.
# Installs the peers (.[test,bench]) and the baselines (distcc, redis-server).
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	@bash scripts/ensure-bench-deps.sh
	@status=0; for b in startup.py build.py "dispatch.py --peers" run_many.py memory.py; do \
	  echo "== bench/$$b"; $(PY) bench/$$b || status=1; echo; done; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
