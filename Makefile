# featx: two commands on a fresh machine.
#   make demo   runs the main job (the whole pipeline on the sample data in data/)
#   make test   runs the test suite (what .ci/run calls)
# Each creates the virtualenv and installs what it needs by itself.
#
# torch is installed first and on purpose: the CPU build by default. On a GPU machine:
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
RUN_DIR ?= .runs/demo
BENCH_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.featx-installed

.PHONY: demo test test-deps bench-deps lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/featx demo --out $(RUN_DIR)

# System packages the tests drive for real: Debian's Chromium for the Prefect UI test.
test-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) test-deps
	$(BIN)/ruff check .
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests; check testpaths and -m/-k filters" >&2; exit 1; fi; \
	exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# What the quality benchmark builds its real corpora from: espeak-ng's voices (spoken digits)
# and apt's package lists (Debian package descriptions).
bench-deps:
	@command -v espeak-ng >/dev/null 2>&1 && ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null)

# The benchmark suite: tests/benchmarks/results.{json,md} and the table (about 40 min on
# 2 cores, 25 of them the quality stage).
#   make bench BENCH_ARGS=--quick   checks the harness in 2-3 minutes
bench: $(STAMP) bench-deps
	$(BIN)/python tests/benchmarks/suite.py $(BENCH_ARGS)

clean:
	rm -rf .runs .pytest_cache .ruff_cache
