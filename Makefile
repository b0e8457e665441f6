# Everything a fresh machine needs: `make test` and `make demo` create or update .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Prefect keeps its state (and its temporary server's SQLite database) inside the project; its first
# start runs database migrations that take longer than the default 20 s on a 2-core machine.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,spark,ray]"
	# img2dataset pulls in the `dataclasses` backport, which shadows the standard library module and
	# breaks Prefect's server ("dataclass() got an unexpected keyword argument 'slots'").
	$(BIN)/pip uninstall --quiet -y dataclasses
	$(BIN)/python -c "import dataclasses, sys; assert dataclasses.__file__.startswith(sys.base_prefix), dataclasses.__file__"
	touch $@

# One pytest-xdist worker per core, each test file on one worker (its module fixtures, such as a tiny
# project's pipeline run, are built once); tests/conftest.py gives each worker one compute thread.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .

# The whole pipeline through the Prefect flow (flows/pipeline.py): one task per DVC stage, each
# `dvc repro --single-item <stage>` (DVC skips what is up to date), then `dvc push` to the local remote.
# Prefect's local server (SQLite under .prefect/) starts for the run and stops after it. Prints the
# stages, the metrics table and where the report is. DEMO_ARGS, e.g. "--set teacher.epochs=4 --until features".
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m flows.pipeline $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/download.py

clean:
	rm -rf data/world data/shards data/teacher data/features metrics .prefect
