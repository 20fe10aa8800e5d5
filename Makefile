# The targets CI and people both run. `make ci` is what .ci/run calls.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Debian packages the tests drive as real peers (clients, servers, checkers).
SYSTEM_PACKAGES :=
# Interop clients (tests/interop): swaks (+ Net::SSLeay for its TLS), msmtp, PHPMailer on PHP,
# Postfix as a relaying client (+ the Cyrus SASL PLAIN/LOGIN plugins its SMTP client needs).
SYSTEM_PACKAGES += swaks libnet-ssleay-perl msmtp php-cli libphp-phpmailer postfix libsasl2-modules
# Deployment checkers: systemd-analyze (verify, security), promtool (metrics, rules, rule tests).
SYSTEM_PACKAGES += systemd prometheus
# The PostgreSQL spool's tests start their own throwaway cluster (tests/support/pg.py).
SYSTEM_PACKAGES += postgresql
# A TCP load balancer sending PROXY v1/v2 in front of the gateway (tests/integration/test_proxy_protocol.py).
SYSTEM_PACKAGES += haproxy
# ss: the listeners' accept-queue size (tests/integration/test_listen_backlog.py).
SYSTEM_PACKAGES += iproute2

.PHONY: install install-test system-deps run lint format typecheck test ci bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python  ## the gateway alone
	$(BIN)/pip install --quiet -e .

run: install  ## run on the embedded default: SMTP 127.0.0.1:2525, outbox provider
	$(BIN)/smtp2api serve

system-deps:  ## Debian packages the interop and service tests use (needs root)
	./scripts/install-system-deps $(SYSTEM_PACKAGES)
	./scripts/install-node-deps

install-test: $(BIN)/python system-deps  ## everything the test suite needs
	$(BIN)/pip install --quiet -e '.[test]'

lint:
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format:
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

typecheck:
	$(BIN)/mypy src

test:
	$(BIN)/pytest --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

ci: install-test lint typecheck test  ## install what the tests need, then run all of it

BENCH_ARGS ?=
bench: install-test  ## the issue-6 benchmark (docs/performance.md); e.g. BENCH_ARGS="--repeat 1"
	$(BIN)/pip install --quiet -e '.[test,speed]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage htmlcov dist build
