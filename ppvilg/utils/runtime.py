"""Process set-up shared by every tool: quiet imports, device, CPU threads, seeds, rank-aware logging."""
import contextlib
import logging
import os
import random
import sys
import warnings

warnings.filterwarnings("ignore", message="No ccache found")  # paddle's cpp_extension nags at import time
warnings.filterwarnings("ignore", message="When training, we now always track global mean")  # BatchNorm notice

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from ppvilg_deploy.cpu import describe as describe_mkl  # noqa: E402


def rank_and_world():
    return int(os.environ.get("PADDLE_TRAINER_ID", 0)), int(os.environ.get("PADDLE_TRAINERS_NUM", 1))


def get_logger(name="ppvilg"):
    """Rank 0 logs INFO to stdout; other ranks log only warnings, prefixed with their rank."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        rank, world = rank_and_world()
        handler = logging.StreamHandler(sys.stdout)
        tag = f"[rank {rank}] " if world > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.propagate = False
    return logger


def setup_device(device="auto", num_threads=2):
    """Select the device and, on CPU, the kernel thread count (paddle defaults to 1 thread otherwise)."""
    if device == "auto":
        device = "gpu" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else "cpu"
    if device.startswith("gpu") and not paddle.device.is_compiled_with_cuda():
        raise RuntimeError(f"Global.device={device!r} but this paddle build has no CUDA support "
                           "(install paddlepaddle-gpu, or use Global.device=cpu)")
    if device.startswith("gpu") and ":" not in device:
        device = f"gpu:{rank_and_world()[0] % max(1, paddle.device.cuda.device_count())}"
    paddle.set_device(device)
    if device == "cpu" and num_threads:
        paddle.base.core.set_num_threads(int(num_threads))
    if device == "cpu":
        get_logger().info(describe_mkl())
    return device


@contextlib.contextmanager
def training_kernels():
    """Paddle kernel settings for a training step (Trainer.fit enters it around each), restored on exit. On CPU,
    stride kernels off: with them a transpose or slice is a strided view, and the backward of the attention's
    reshape / transpose pairs then copies through a slow generic strided kernel (the demo's stage-2 step: 1.07 s
    with them, 0.69 s without; benchmarks/bench_train.py). Decoding keeps them: its KV-cache slices are views (~15% faster)."""
    if paddle.get_device() != "cpu":
        yield
        return
    old = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    try:
        yield
    finally:
        paddle.set_flags({"FLAGS_use_stride_kernel": old})


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    paddle.seed(seed)


def setup_from_config(cfg):
    device = setup_device(cfg.Global.device, cfg.Global.num_threads)
    seed_everything(cfg.Global.seed)
    return device
