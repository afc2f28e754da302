# `make demo` and `make test` install what is missing first. They use the active virtualenv / conda env if
# there is one, else create .venv (with access to system packages, so an installed paddlepaddle-gpu is reused).
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON ?= python
else
PYTHON ?= .venv/bin/python
endif

.PHONY: install fid-weights demo demo-long test gpu-check clean-demo

install:
	@if [ "$(PYTHON)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then python3 -m venv --system-site-packages .venv; fi
	@$(PYTHON) tools/install_deps.py

fid-weights: install
	$(PYTHON) tools/get_fid_weights.py

# SEED=N: both training stages seeded with N (default: the configs' 42), everything in output/demo_seedN
SEED ?=
DEMO_ARGS = $(if $(SEED),--seed $(SEED) --out output/demo_seed$(SEED))

demo: install
	$(PYTHON) tools/run_demo.py $(DEMO_ARGS)

# after `make demo` (with the same SEED): its stage 2 trained 2000 steps longer, mostly on the yes/no questions (~12
# more minutes on 2 CPU cores), then the same report on the test split in output/demo/long (output/demo_seedN/long)
demo-long: install
	$(PYTHON) tools/run_demo.py --long $(DEMO_ARGS)

test: install
	@$(PYTHON) tools/get_fid_weights.py || echo "make test: the FID Inception weights could not be fetched (see above); the FID tests will be SKIPPED"
	$(PYTHON) -m pytest -q -rs tests

# one GPU, < 8 minutes: AMP, fused attention and fp16 predictors against fp32 (tests/test_gpu.py), the 2-GPU
# layouts where there are 2 GPUs, and decode speed at base_300m; without a GPU every part says it is skipped
gpu-check: install
	$(PYTHON) -m pytest -q -rs -s tests/test_gpu.py "tests/test_distributed.py::test_gpu_only_layouts_run_and_track_one_process"
	@if $(PYTHON) -c "import paddle, sys; sys.exit(0 if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() else 1)"; then \
		$(PYTHON) benchmarks/bench_generate.py --device gpu --roofline-batches 1 8 32; \
	else echo "gpu-check: no CUDA GPU here: the decode benchmark at base_300m on GPU is SKIPPED"; fi

clean-demo:
	rm -rf output/demo output/demo_seed*
