import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ppvilg.utils.runtime import setup_device  # noqa: E402
import ppvilg.engine.tasks  # noqa: E402,F401  (registers the tasks ppvilg.config loads configs for)

setup_device("cpu", 2)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Code shards of shapes images from a (randomly initialised) tiny VQ: 8x8 codes, 64 values."""
    from ppvilg.config import load_config
    from ppvilg.data.datasets import build_dataset
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
        tokenize_to_shards(vq, str(root), build_dataset(vq_cfg.Data[split], 16), str(root / out), 64, 32)
    return root


@pytest.fixture(scope="session")
def run_dirs(tmp_path_factory):
    """A tiny stage-1 and stage-2 checkpoint trained for 2 steps each (plumbing, not quality)."""
    import numpy as np
    from ppvilg.config import load_config
    from ppvilg.data.images import write_png
    from ppvilg.data.datasets import build_dataset
    from ppvilg.data.shards import tokenize_to_shards
    from ppvilg.engine.tasks import build_task
    from ppvilg.engine.trainer import Trainer
    from ppvilg.checkpoints import load_image_tokenizer
    from ppvilg.utils.runtime import seed_everything
    root = tmp_path_factory.mktemp("pipeline")
    seed_everything(0)
    vq_cfg = load_config(os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml"),
                         [f"Global.output_dir={root / 'vq'}", "Train.max_steps=2", "Data.eval.num_samples=16"])
    Trainer(vq_cfg, build_task(vq_cfg)).fit()
    vq, _, folder = load_image_tokenizer(str(root / "vq"))
    for split in ("train", "eval"):
        tokenize_to_shards(vq, folder, build_dataset(vq_cfg.Data[split], 16), str(root / "codes" / split), 64, 32)
    cfg = load_config(os.path.join(ROOT, "configs/tests/vilg_tiny.yaml"),
                      [f"Global.output_dir={root / 'vilg'}", f"ImageTokenizer.checkpoint={root / 'vq'}",
                       f"Data.train.path={root / 'codes' / 'train'}", f"Data.eval.path={root / 'codes' / 'eval'}",
                       "Train.max_steps=2"])
    Trainer(cfg, build_task(cfg)).fit()
    img = np.zeros((40, 30, 3), np.uint8)
    img[10:20, 5:15] = (230, 30, 30)
    write_png(str(root / "red.png"), img)
    return root


@pytest.fixture(scope="session")
def exported(run_dirs, tmp_path_factory):
    """(ViLGInference of the tiny checkpoint, its DeployPipeline, the export folder), exported with
    Eval.top_k=5."""
    import sys
    from ppvilg.config import load_config
    from ppvilg.export import export
    from ppvilg.inference import ViLGInference
    sys.path.insert(0, os.path.join(ROOT, "deploy", "python"))
    from ppvilg_deploy.predictor import DeployPipeline
    out = tmp_path_factory.mktemp("export") / "model"
    pipe = ViLGInference.from_checkpoint(str(run_dirs / "vilg"))
    cfg = load_config(os.path.join(ROOT, "configs/tests/vilg_tiny.yaml"), ["Eval.top_k=5"])
    export(pipe, cfg, str(out))
    return pipe, DeployPipeline(str(out), threads=1), out
