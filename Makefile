# Two commands do all the set-up: `make test` and `make bench` create .venv when missing,
# install the pinned CPU torch, the package (editable, dev extras) and build the extension.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.comm_fast-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
EXT_STAMP := $(VENV)/.comm_fast-ext

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_DEFAULT_FP_FUSION ?= 1

.PHONY: test bench venv ext cmake clean info

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH)
	COMM_FAST_NO_EXT=1 $(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	@touch $(STAMP)

# The extension is built in place (not by pip), and rebuilt whenever a csrc file changes.
$(EXT_STAMP): $(STAMP) $(EXT_SOURCES) setup.py
	$(PY) setup.py --quiet build_ext --inplace
	@touch $(EXT_STAMP)

ext: $(EXT_STAMP)

test: $(EXT_STAMP)
	$(PY) -m pytest tests -q

bench: $(EXT_STAMP)
	$(PY) -m comm_fast.cli bench --preset cpu-small --json bench-out/bench.json --plot bench-out/bench.png

info: $(EXT_STAMP)
	$(PY) -m comm_fast.info

cmake: $(STAMP)
	cmake -S . -B build -DPython_EXECUTABLE=$(abspath $(PY)) && cmake --build build -j 2

clean:
	rm -rf build bench-out comm_fast/_C*.so *.egg-info
