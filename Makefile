# trajdata: `make demo` (set up + small collection), `make test`, `make bench`, `make scaling-report`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
SPEC ?= specs/cpu.toml
SWEEP_ARGS ?= --parallel 2

.PHONY: install test test-fast demo bench scaling-report clean

install: $(VENV)/.installed

# torch is pinned (and installed first) so pip never pulls the CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all]"
	touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The edit-test loop: everything not marked slow (under a minute).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/trajdata collect scripted --out demo-data --shards 4 --episodes-per-shard 2 --workers 2 --max-steps 2000
	$(BIN)/trajdata inspect demo-data
	$(BIN)/trajdata verify demo-data
	$(BIN)/trajdata show demo-data --episode 000000-0000 --step 200
	$(BIN)/trajdata train bc demo-data --out demo-run --width 64 --layers 1 --seq-len 128 --batch-size 4 --lr 1e-3 --samples 4000
	$(BIN)/trajdata eval demo-run --episodes 4 --max-steps 300 --workers 2 --envs 2

bench: install
	mkdir -p bench-results
	set -e; for f in bin/bench_*.py; do n=$$(basename $$f .py); n=$${n#bench_}; \
	  echo "== $$f"; $(BIN)/python $$f --out bench-results/$$n.json; done

scaling-report: install
	PATH="$(CURDIR)/$(BIN):$$PATH" SPEC="$(SPEC)" bash bin/scaling_report.sh $(SWEEP_ARGS)

clean:
	rm -rf demo-data demo-run bench-results scaling-report
