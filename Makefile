# Two commands do all set-up on a fresh machine:
#   make demo   builds .venv if needed, then runs `slimkit demo`
#   make test   builds .venv if needed, then runs the whole test suite
# torch==2.13.0 is installed first (a CPU wheel); the project's torch range admits it, so
# installing the project pulls no CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.slimkit-installed

.PHONY: env demo check test soak bench clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/slimkit demo

# The linter (ruff) and the type checker (mypy); `make test` runs them first.
check: $(STAMP)
	$(BIN)/ruff check slimkit tests bench
	$(BIN)/mypy

# OMP_WAIT_POLICY=PASSIVE: torch's idle OpenMP threads sleep instead of spinning, so the ONNX
# Runtime sessions the tests run in the same process get the cores.
test: check
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q

# The long fault-injection runs (20 SIGKILLs across one search; 4 workers x 25 trials on one
# PostgreSQL study), about 3-4 minutes together; `make test` skips them.
soak: $(STAMP)
	SLIMKIT_SOAK=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m soak

clean:
	rm -rf $(VENV) runs .pytest_cache
