# The two commands a newcomer needs:   make demo   and   make test
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU torch must come first, or pip pulls several GB of CUDA wheels through monai.
# On a GPU machine: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX=<your CUDA wheel index>
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP  := $(VENV)/.segflow-installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: install demo test lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev,flows]"
	touch $(STAMP)

demo: install
	$(PY) flows/pipeline.py pipelines/spacenet_atlanta_buildings.yaml

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check segflow flows tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
