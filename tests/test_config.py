import glob
import os

import paddle
import pytest
import yaml

from conftest import ROOT
from ppvilg.config import ConfigError, load_config, load_resolved, parse_override, save_config
from ppvilg.distributed.env import ParallelState
from ppvilg.engine.tasks import build_task

TINY = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")


def test_base_inheritance_and_preset():
    cfg = load_config(TINY)
    assert cfg.Global.task == "vqgan"                # from _base_
    assert cfg.Optimizer.betas == [0.5, 0.9]         # from _base_
    assert cfg.Optimizer.lr == 1e-3                  # leaf overrides base
    assert cfg.Model.num_codes == 64                 # from the 'tiny' preset
    assert cfg.Train.micro_batch_size == cfg.Train.batch_size  # derived


def test_overrides_are_parsed_safely():
    cfg = load_config(TINY, ["Train.max_steps=7", "Optimizer.lr=3e-4", "Model.channel_mult=[1, 2]",
                             "Global.output_dir=__import__('os')", "Data.train.lang=zh"])
    assert cfg.Train.max_steps == 7 and cfg.Optimizer.lr == pytest.approx(3e-4)
    assert cfg.Model.channel_mult == [1, 2]
    assert cfg.Global.output_dir == "__import__('os')"  # a string, never evaluated
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("Train.max_steps")


def test_unknown_keys_name_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"no_such_key"):
        load_config(TINY, ["Global.no_such_key=1"])
    with pytest.raises(ConfigError, match=r"Train\.max_step'.*did you mean 'Train\.max_steps'"):
        load_config(TINY, ["Train.max_step=1"])
    with pytest.raises(ConfigError, match=r"Model\.num_code'.*did you mean 'Model\.num_codes'"):
        load_config(TINY, ["Model.num_code=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {TINY}\nTrian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'Trian'.*did you mean 'Train'"):
        load_config(str(bad))


def test_type_and_value_errors():
    with pytest.raises(ConfigError, match=r"Train\.max_steps' expects int"):
        load_config(TINY, ["Train.max_steps=abc"])
    with pytest.raises(ConfigError, match="multiple of Train.accum_steps"):
        load_config(TINY, ["Train.accum_steps=3"])
    with pytest.raises(ConfigError, match="Model.preset 'huge'"):
        load_config(TINY, ["Model.preset=huge"])
    with pytest.raises(ConfigError, match="multiple of the downsampling factor"):
        load_config(TINY, ["Data.image_size=15", "Model.resolution=15"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(os.path.join(ROOT, "configs/no_such.yaml"))


def test_frozen_and_saved_round_trip(tmp_path):
    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match="frozen"):
        cfg.Train.max_steps = 3
    save_config(cfg, tmp_path / "config.yaml")
    assert load_resolved(tmp_path / "config.yaml") == cfg


def _random_vgg_weights(path):
    from paddle.vision.models import vgg16
    from ppvilg.checkpoints import write_tensors
    write_tensors(str(path), vgg16(pretrained=False, with_pool=False, num_classes=0).state_dict())


CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs/**/*.yaml"), recursive=True)
                 if "_base_" not in p)  # _base_/ holds fragments that leaf configs inherit


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_loads_and_builds(path, tmp_path):
    with open(path, encoding="utf-8") as f:
        d = (yaml.safe_load(f) or {}).get("Distributed") or {}
    n = max(1, d.get("dp_degree", 1)) * d.get("mp_degree", 1) * d.get("pp_degree", 1) * d.get("sharding_degree", 1)
    overrides = [f"Distributed.world_size={n}"] if n > 1 else []  # a cluster layout: validate it for its size
    cfg = load_config(path, overrides)
    if cfg.get("Loss", {}).get("perceptual_weight", 0) > 0:  # weights are the user's file: use random ones
        _random_vgg_weights(tmp_path / "vgg16.safetensors")
        overrides.append(f"Loss.perceptual_weights={tmp_path / 'vgg16.safetensors'}")
    with paddle.LazyGuard():  # parameters are declared, not allocated: the 10B preset builds in MBs
        task = build_task(load_config(path, overrides), ParallelState.single())   # the model of one process
    assert sum(p.size for p in task.modules()["model"].parameters()) > 0


VILG_TINY = os.path.join(ROOT, "configs/tests/vilg_tiny.yaml")


def test_the_renamed_image_tokenizer_section_still_loads_with_a_deprecation_message(tmp_path):
    with pytest.warns(FutureWarning, match="'Tokenizer' is now 'ImageTokenizer'"):
        cfg = load_config(VILG_TINY, ["Tokenizer.checkpoint=some/vq"])
    assert cfg.ImageTokenizer.checkpoint == "some/vq" and "Tokenizer" not in cfg
    with pytest.raises(ConfigError, match="both 'Tokenizer' and its new name 'ImageTokenizer'"):
        load_config(VILG_TINY, ["Tokenizer.checkpoint=a", "ImageTokenizer.checkpoint=b"])
    # a checkpoint's config.yaml written before the rename reads with the new name
    old = load_config(VILG_TINY, ["ImageTokenizer.checkpoint=old/vq"]).to_dict()
    old["Tokenizer"] = old.pop("ImageTokenizer")
    with open(tmp_path / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(old, f)
    assert load_resolved(str(tmp_path / "config.yaml")).ImageTokenizer.checkpoint == "old/vq"


def test_bad_eval_sampler_settings_are_config_errors():
    with pytest.raises(ConfigError, match="Eval: sampler setting 'top_p' must be a number in"):
        load_config(VILG_TINY, ["Eval.top_p=0"])


def test_config_without_registered_tasks_says_what_to_import():
    """ppvilg.config imports no training code: tasks register themselves; a process that has imported none is
    told what to import."""
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, '.'); from ppvilg.config import load_config, ConfigError\n"
            "try:\n    load_config('configs/tests/vilg_tiny.yaml')\nexcept ConfigError as e:\n    print(e)\n"
            "print(sorted(m for m in sys.modules if m.startswith('ppvilg.engine')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "import ppvilg.engine.tasks first" in r.stdout and r.stdout.strip().endswith("[]"), r.stdout + r.stderr


@pytest.mark.parametrize("override,message", [
    ("Train.batch_size=-4", "'Train.batch_size' must be >= 1, got -4"),
    ("Train.save_every=-1", r"'Train.save_every' must be >= 0 \(0: only at the end\)"),
    ("Train.eval_every=-5", "'Train.eval_every' must be >= 0"),
    ("Optimizer.lr=0", "'Optimizer.lr' must be > 0"),
    ("Optimizer.min_lr_ratio=2", r"'Optimizer.min_lr_ratio' must be in \[0, 1\]"),
    ("Data.num_workers=-1", "'Data.num_workers' must be >= 0"),
    ("Data.eval.limit=0", "'Data.eval.limit' must be >= 1"),
    ("Model.num_codes=0", "'Model.num_codes' must be >= 1"),
    ("Loss.disc_start=-1", "'Loss.disc_start' must be >= 0"),
    ("Data.train.on_bad_line=ignore", "on_bad_line must be error or skip"),
])
def test_numbers_out_of_range_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_the_shapes_splits_the_config_accepts_are_the_generators():
    from ppvilg.config import SHAPES_SPLITS
    from ppvilg.data.shapes import SPLITS
    assert SHAPES_SPLITS == SPLITS
    for name in ("finetune_diamond_lora", "finetune_diamond_full"):
        cfg = load_config(os.path.join(ROOT, "configs", "demo", f"{name}.yaml"))
        assert cfg.Data.train.split == "novel_train" and cfg.Loss.vqa_start == 0
