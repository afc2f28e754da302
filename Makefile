# `make demo` and `make test` install what is missing first. They use the active virtualenv / conda env if
# there is one, else create .venv (with access to system packages, so an installed paddlepaddle-gpu is reused).
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON ?= python
else
PYTHON ?= .venv/bin/python
endif

.PHONY: install fid-weights demo test clean-demo

install:
	@if [ "$(PYTHON)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then python3 -m venv --system-site-packages .venv; fi
	@$(PYTHON) tools/install_deps.py

fid-weights: install
	$(PYTHON) tools/get_fid_weights.py

demo: install
	$(PYTHON) tools/run_demo.py

test: install
	@$(PYTHON) tools/get_fid_weights.py || echo "make test: the FID Inception weights could not be fetched (see above); the FID tests will be SKIPPED"
	$(PYTHON) -m pytest -q -rs tests

clean-demo:
	rm -rf output/demo
