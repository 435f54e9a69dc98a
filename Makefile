# Every target sets up .venv by itself on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-dev-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: venv demo eval test bench serve-dev clean system-deps bench-serve

# demo, eval and serve-dev need requirements.txt alone: a first `make demo` compiles nothing.
$(RUN_STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.installed-run-* && touch $@

# Tests and benchmarks add requirements-dev.txt. Its llama-cpp-python compiles llama.cpp: CPU only,
# portable (x86-64 with AVX2, not -march=native), no tests/tools/examples/server, one compile job per
# core (about 8 minutes on an idle 2-core machine, docs/deploy.md).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
$(STAMP): $(RUN_STAMP) requirements-dev.txt
	@echo "安装测试依赖：第一次要从源码编译 llama.cpp（llama-cpp-python），2 核机器上约 10 分钟，请耐心等待…"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)} \
	  $(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	@rm -f $(VENV)/.installed-dev-* && touch $@

venv: $(STAMP)

# Train the synthetic demo on this machine (CPU is fine), then score it on unseen test scenes.
demo: $(RUN_STAMP)
	$(PY) train_vision.py

eval: $(RUN_STAMP)
	$(PY) evaluate.py

# The browser test (tests/test_web.py) drives Debian's Chromium; a CJK font keeps its screenshots readable.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@test -x /usr/bin/chromium || { echo "安装浏览器测试需要的 Chromium…"; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium fonts-wqy-zenhei; }

test: $(STAMP) system-deps
	$(PY) -m pytest -q

# API on :8000 (restarts when a .py file changes) and the web page on :3000; Ctrl-C stops both.
# The model comes from LLM_CHECKPOINT (default checkpoints/vision_trained_model.pt).
WEB_PORT ?= 3000
serve-dev: $(RUN_STAMP)
	@$(PY) -m http.server $(WEB_PORT) --bind 127.0.0.1 --directory web >/dev/null 2>&1 & web=$$!; \
	trap 'kill $$web 2>/dev/null' EXIT; sleep 0.5; \
	kill -0 $$web 2>/dev/null || { echo "错误：网页端口 $(WEB_PORT) 已被占用，可用 make serve-dev WEB_PORT=3001 换一个。"; exit 1; }; \
	echo "网页：http://localhost:$(WEB_PORT)   接口：http://localhost:$${SERVE_PORT:-8000}"; \
	$(PY) serve.py --reload

# Training samples/s and generation tokens/s of our model vs transformers' LlavaForConditionalGeneration
# at the same sizes, measured side by side in one process each, ratios printed (docs/benchmarks.md).
# BENCH_THREADS=1 (default) runs both on one thread: on a shared 2-core machine two threads stall each
# other and the figures swing tenfold; BENCH_THREADS=0 uses torch's default (all cores).
# BENCH_TRAIN_FLAGS=--compile adds a torch.compile row.
BENCH_THREADS ?= 1
BENCH_TRAIN_FLAGS ?=
bench: $(STAMP)
	$(PY) bench/bench_train.py --threads $(BENCH_THREADS) $(BENCH_TRAIN_FLAGS) --out bench/results/train.json
	$(PY) bench/bench_generate.py --threads $(BENCH_THREADS) --out bench/results/generate.json
	$(PY) bench/bench_pipeline.py --threads $(BENCH_THREADS)
	$(PY) bench/bench_packing.py --threads $(BENCH_THREADS)
	$(PY) bench/bench_words.py --threads $(BENCH_THREADS)
	$(PY) bench/bench_presets.py --threads $(BENCH_THREADS)
	$(PY) bench/bench_optim.py --threads $(BENCH_THREADS)
	$(PY) bench/bench_serve.py

# Serving throughput: 8 concurrent clients vs the same requests one at a time (docs/benchmarks.md).
bench-serve: $(STAMP)
	$(PY) bench/bench_serve.py

clean:
	rm -rf $(VENV) .pytest_cache
