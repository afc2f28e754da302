import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ppvilg.utils.runtime import setup_device  # noqa: E402

setup_device("cpu", 2)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Code shards of shapes images from a (randomly initialised) tiny VQ: 8x8 codes, 64 values."""
    from ppvilg.config import load_config
    from ppvilg.data.shards import tokenize_to_shards
    from ppvilg.engine.tasks import build_task
    from ppvilg.utils.runtime import seed_everything
    root = tmp_path_factory.mktemp("codes")
    vq_cfg = load_config(os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml"),
                         ["Data.train.num_samples=96", "Data.eval.num_samples=32"])
    seed_everything(0)
    vq = build_task(vq_cfg).model
    vq.eval()
    for split, out in (("train", "train"), ("eval", "eval")):
        tokenize_to_shards(vq, str(root), vq_cfg.Data[split], 16, str(root / out), 64, 32)
    return root
