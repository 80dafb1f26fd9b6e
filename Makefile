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

# The font billing prints Chinese names with in invoice PDFs (installed when missing, as root).
RUN_PACKAGES := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc=fonts-wqy-microhei

run: $(STAMP)
	bash scripts/ensure-system-packages.sh $(RUN_PACKAGES)
	$(PY) -m gpumeter up $(ARGS)

run-no-fleet: $(STAMP)
	bash scripts/ensure-system-packages.sh $(RUN_PACKAGES)
	$(PY) -m gpumeter up --no-fleet $(ARGS)

# Every broker-facing test runs on Tansu and on Apache Kafka (KRaft; its jars are fetched from Maven
# Central once, before the workers start), in TEST_WORKERS processes (the tests mostly wait on
# brokers, services and timeouts: two share two cores well).
TEST_WORKERS ?= 2

test: $(STAMP)
	bash scripts/ensure-system-packages.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy schemas services gpumeter
	$(PY) -m gpumeter.kafkabroker fetch
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

# Only the broker-facing tests, on Apache Kafka alone (GPUMETER_TEST_BROKERS: tansu, kafka or both).
test-kafka: $(STAMP)
	$(PY) -m gpumeter.kafkabroker fetch
	GPUMETER_TEST_BROKERS=kafka $(PY) -m pytest -q -n $(TEST_WORKERS) -m broker $(ARGS)

bench: $(STAMP)
	$(PY) -m gpumeter.bench $(ARGS)

drill: $(STAMP)
	$(PY) -m gpumeter.drill $(ARGS)

clean:
	rm -rf var
