# dsconvert: two entry points for a fresh machine.
#   make demo   build a DeepSeek-V3-layout FP8 checkpoint locally, inspect it, convert it to BF16, validate it
#   make test   run the test suite (what .ci/run calls)
# Both create .venv themselves. torch is pinned to the 2.13.0 CPU wheel first, so nothing pulls a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= tiny
DEMO   ?= demo-out
WHEELS ?= ../shared/wheels

.PHONY: demo test test-fast test-slow bench clean venv

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@if [ -d "$(WHEELS)" ]; then $(PY) -m pip install -q --find-links $(WHEELS) llama-cpp-python==0.3.36 \
	  || echo "llama-cpp-python not installed: the llama.cpp oracle tests will be skipped"; fi
	touch $@

venv: $(VENV)/.stamp

demo: $(VENV)/.stamp
	rm -rf $(DEMO)
	$(VENV)/bin/dsconvert make-fixture $(DEMO)/DeepSeek-V3-$(PRESET)-FP8 --preset $(PRESET)
	$(VENV)/bin/dsconvert inspect $(DEMO)/DeepSeek-V3-$(PRESET)-FP8
	$(VENV)/bin/dsconvert fp8-to-bf16 $(DEMO)/DeepSeek-V3-$(PRESET)-FP8 -o $(DEMO)/DeepSeek-V3-$(PRESET)-BF16 --validate
	$(VENV)/bin/dsconvert inspect $(DEMO)/DeepSeek-V3-$(PRESET)-BF16

test: $(VENV)/.stamp
	$(PY) -m pytest -q -ra -m "not slow"

test-slow: $(VENV)/.stamp
	$(PY) -m pytest -q -ra -m slow

test-fast: $(VENV)/.stamp
	$(PY) -m pytest -q -ra -m unit

bench: $(VENV)/.stamp
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) $(DEMO) .bench .pytest_cache
