"""ppvilg deployment runtime: the text tokenizer, numpy decoding algorithms and Paddle Inference predictors
over a folder written by tools/export_model.py. It never imports the training package (ppvilg)."""

from ppvilg_deploy.cpu import apply_mkl_setting as _apply_mkl_setting

_apply_mkl_setting()   # MKL's AVX2 path on AMD CPUs (see cpu.py), before any Paddle kernel runs
