# evcharging — the commands a user needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CPS ?= 2
DRIVERS ?=
LOAD ?=
SITES ?=
DB ?=
CENTRALS ?=
ARGS ?=
COMPOSE := docker compose -f docker/docker-compose.yml --env-file $(if $(wildcard .env),.env,.env.example)

.DEFAULT_GOAL := help
.PHONY: help install run test test-unit test-integration test-e2e chaos lint format bench \
        bench-fleet bench-energy bench-ocpp broker-start broker-stop broker-status \
        postgres-start postgres-stop postgres-status up down logs clean

help: ## list the commands
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-17s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install everything (done by the other targets too)

run: $(STAMP) ## start everything locally: broker, Central, CPS CPs (one fleet above 20), DRIVERS, LOAD/s; DB=postgres: Central on a local PostgreSQL; CENTRALS=2: two Centrals on it (ports 8000, 8001)
	$(PY) -m evcharging run --cps $(CPS) $(if $(DRIVERS),--drivers $(DRIVERS)) \
	  $(if $(LOAD),--load $(LOAD)) $(if $(SITES),--sites $(SITES)) $(if $(DB),--db $(DB)) \
	  $(if $(CENTRALS),--centrals $(CENTRALS)) $(ARGS)

test: $(STAMP) ## unit, integration, end-to-end and fast chaos tests (starts its own Kafka broker)
	$(PY) -m evcharging.devtools.kafka_broker fetch
	bash scripts/ensure_chromium.sh
	bash scripts/ensure_prometheus.sh
	bash scripts/ensure_faketime.sh
	bash scripts/ensure_postgres.sh
	$(PY) -m pytest -m "not chaos" $(ARGS)

test-unit: $(STAMP) ## only the unit tests (no broker; promtool checks the alert rules; PostgreSQL for the repository contract)
	bash scripts/ensure_prometheus.sh
	bash scripts/ensure_postgres.sh
	$(PY) -m pytest tests/unit $(ARGS)

test-integration: $(STAMP) ## only the integration tests (real broker, a real Prometheus, PostgreSQL)
	bash scripts/ensure_prometheus.sh
	bash scripts/ensure_postgres.sh
	$(PY) -m pytest tests/integration $(ARGS)

test-e2e: $(STAMP) ## only the end-to-end tests (real broker, real processes, Chromium)
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest tests/e2e $(ARGS)

chaos: $(STAMP) ## the full fault matrix with sessions running; prints the ledger table (~15 min)
	$(PY) -m evcharging.devtools.kafka_broker fetch
	bash scripts/ensure_faketime.sh
	bash scripts/ensure_postgres.sh
	$(PY) -m pytest tests/chaos -m chaos $(ARGS)

lint: $(STAMP) ## ruff and mypy
	$(PY) -m ruff check .
	$(PY) -m mypy

format: $(STAMP) ## format the code with ruff
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP) ## request→ACCEPTED latency over a real broker (see benchmarks/)
	$(PY) benchmarks/accept_latency.py $(ARGS)

bench-fleet: $(STAMP) ## Central + a CP Fleet + load at 100..10,000 CPs: report and plot in benchmarks/results/ (~15 min; ARGS="--centrals 1,2": 1 and 2 Centrals side by side)
	$(PY) benchmarks/fleet_bench.py $(ARGS)

bench-ocpp: $(STAMP) ## 1,000 and 5,000 OCPP chargers on one OCPP gateway: boot, round trips, CPU/RSS vs the targets (ARGS=--quick: 50, 20 s)
	$(PY) benchmarks/ocpp_bench.py $(ARGS)

bench-energy: $(STAMP) ## one limited site for a simulated day: equal vs least_laxity, seconds (ARGS=--acnportal adds Caltech's ACN-Sim)
	$(if $(findstring --acnportal,$(ARGS)),$(PY) -m pip install --quiet -r requirements-bench.txt)
	$(PY) benchmarks/energy_bench.py $(ARGS)

broker-start: $(STAMP) ## start a local Kafka broker on 127.0.0.1:9092 in the background (ARGS="--sasl --reset": SPEC §11)
	$(PY) -m evcharging.devtools.kafka_broker start --port 9092 $(ARGS)

broker-stop: $(STAMP) ## stop the local Kafka broker
	$(PY) -m evcharging.devtools.kafka_broker stop --port 9092

broker-status: $(STAMP) ## is the local Kafka broker running?
	@$(PY) -m evcharging.devtools.kafka_broker status --port 9092 || true

postgres-start: $(STAMP) ## start a local PostgreSQL on 127.0.0.1:55432 in the background; prints CENTRAL_DB_URL
	bash scripts/ensure_postgres.sh
	$(PY) -m evcharging.devtools.postgres start --port 55432 $(ARGS)

postgres-stop: $(STAMP) ## stop the local PostgreSQL
	$(PY) -m evcharging.devtools.postgres stop --port 55432

postgres-status: $(STAMP) ## is the local PostgreSQL running? (and its CENTRAL_DB_URL)
	@$(PY) -m evcharging.devtools.postgres status --port 55432 || true

up: ## Docker Compose: build and start Kafka and every service (writes an API token and the Kafka passwords into .env)
	$(PYTHON) -m evcharging.devtools.env_token .env .env.example
	@test -e ocpp-passwords.txt || printf '%s\n' '# OCPP chargers that may connect to ocpp-gateway (SPEC 8): charger_id:password or charger_id:sha256:<hex>, one a line' > ocpp-passwords.txt
	docker compose -f docker/docker-compose.yml --env-file .env up --build -d
	@echo "Dashboard: http://localhost:$${CENTRAL_HTTP_PORT:-8000}/"
	@echo "OCPP chargers: ws://localhost:$${OCPP_WS_PORT:-9000}/ocpp/<charger-id> (passwords in ocpp-passwords.txt)"

down: ## Docker Compose: stop everything
	$(COMPOSE) down

logs: ## Docker Compose: follow the logs
	$(COMPOSE) logs -f

clean: ## remove the venv, caches, databases, local broker and PostgreSQL data (not the jar cache)
	-$(COMPOSE) down -v 2>/dev/null
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .cache/kafka/run \
	  .cache/postgres
	rm -f ev_charging.db ev_charging.db-wal ev_charging.db-shm
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
