# The two commands a new user needs: `make demo` and `make test`. Everything else supports them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip prints a warning per package for this machine's file:// extra indexes; keep the output readable.
LINT_PATHS := $(wildcard agent tests bench)
# make test spreads the suite over the cores (pytest-xdist), at most 4 workers; PYTEST_WORKERS= runs it in one process.
PYTEST_WORKERS ?= -n auto --maxprocesses=4
PIPQUIET := grep -v -E "is ignored: it is neither a file nor a directory" || true

.PHONY: help venv test lint typecheck check demo bench bench-cp bench-decompose bench-instructions profile load lock models clean image chart

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (constraints.txt, each file checked against its sha256)"
	@# Every dependency, pip and setuptools included, by hash; then the project itself, which has no hash,
	@# without dependencies and with that setuptools (no build isolation, so nothing unchecked is fetched).
	@{ $(BIN)/python -m pip install -q --require-hashes --no-deps -r constraints.txt 2>&1; } | $(PIPQUIET)
	@{ PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1; } | $(PIPQUIET)
	@$(BIN)/python -c "import agent, aiobotocore, moto" 
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the pinned set (idempotent)

lint: $(STAMP) ## ruff: style and static checks; lint-imports: the one-way import contracts (.importlinter)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports

typecheck: $(STAMP) ## mypy --strict on the package
	$(BIN)/mypy

test: $(STAMP) ## run the test suite (installs what it needs first)
	@bash tools/install-test-tools.sh
	@# pytest exits 5 when it collected no tests: that must fail loudly, never pass.
	@# Postgres is installed above: a test that cannot find it fails rather than skips.
	DELEGATE_AGENT_REQUIRE_POSTGRES=1 $(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS) || { rc=$$?; if [ $$rc -eq 5 ]; then \
	  echo "make test: pytest collected no tests" >&2; fi; exit $$rc; }

check: lint typecheck test ## everything CI runs

demo: $(STAMP) ## the whole story on this machine: AWS stand-in, control plane, two delegates; DEMO_ARGS=--keep-running leaves it up with the web console
	$(BIN)/delegate-agent demo $(DEMO_ARGS)

bench: $(STAMP) ## performance benchmark against the baselines (see docs/performance.md)
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-cp: $(STAMP) ## the control plane alone: SQLite vs Postgres with 1 and 3 replicas (installs Postgres)
	@bash tools/install-test-tools.sh
	$(BIN)/python -m bench.controlplane $(BENCH_CP_ARGS)

bench-decompose: $(STAMP) ## the AWS handler's CPU per validation, layer by layer, against the SDK's floor
	$(BIN)/python -m bench.decompose $(DECOMPOSE_ARGS)

bench-instructions: $(STAMP) ## instructions per validation, layer by layer (valgrind: a count a busy machine does not move)
	$(BIN)/python -m bench.instructions $(INSTRUCTIONS_ARGS)

profile: $(STAMP) ## where the delegate's CPU goes per validation (py-spy samples, bucketed)
	$(BIN)/python -m bench.profile $(PROFILE_ARGS)

image: $(STAMP) ## build the container image with buildah and smoke-run it as uid 10001 (needs root for apt)
	bash tools/image-check.sh

chart: $(STAMP) ## helm lint, render variants, kubernetes-validate, hadolint
	@bash tools/install-test-tools.sh
	$(BIN)/python -m pytest -q tests/test_chart.py tests/test_chart_controlplane.py

load: $(STAMP) ## 10,000 validations through the control plane and 3 delegates, then again with faults
	$(BIN)/python -m bench.load --tasks $${LOAD_TASKS:-10000}
	$(BIN)/python -m bench.load --tasks $${LOAD_TASKS:-10000} --faults

models: $(STAMP) ## regenerate the pruned AWS service models from the pinned botocore
	$(BIN)/python -m agent.aws.models_gen

lock: ## re-pin constraints.txt (versions and sha256 hashes) after changing dependencies
	bash tools/lock.sh

clean: ## remove the venv and caches
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache .import_linter_cache build *.egg-info
