# The two commands: `make run` (the whole system locally) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run run-no-fleet test test-kafka lint bench drill clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m gpumeter up $(ARGS)

run-no-fleet: $(STAMP)
	$(PY) -m gpumeter up --no-fleet $(ARGS)

test: $(STAMP)
	bash scripts/ensure-system-packages.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy schemas services gpumeter
	$(PY) -m pytest -q $(ARGS)

# The broker-facing tests on Apache Kafka (KRaft, fetched from Maven Central once); GPUMETER_TEST_BROKERS
# takes tansu,kafka for both in one run.
test-kafka: $(STAMP)
	GPUMETER_TEST_BROKERS=kafka $(PY) -m pytest -q -m broker $(ARGS)

bench: $(STAMP)
	$(PY) -m gpumeter.bench $(ARGS)

drill: $(STAMP)
	$(PY) -m gpumeter.drill $(ARGS)

clean:
	rm -rf var
