"""tools/run_demo.py: the commands of `make demo` and `make demo-long` (with SEED=N) wire one folder's stages
together: the tokenizer stage 2 reads is the one stage 1 wrote, the code shards are the ones tokenized, the longer
stage 2 starts from the demo's stage 2, and every training stage gets the seed."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import run_demo  # noqa: E402
from ppvilg.config import load_config  # noqa: E402


def _config(cmd):
    """The resolved config a stage's command line gives (its -c and -o arguments)."""
    path = os.path.join(ROOT, cmd[cmd.index("-c") + 1])
    overrides = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-o"]
    return load_config(path, overrides)


def _arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


@pytest.mark.parametrize("out,seed", [(run_demo.OUT, None), ("output/demo_seed1", 1)])
def test_demo_and_long_stages_use_one_folder_and_seed(out, seed):
    demo = dict(run_demo.stages(out, seed))
    long = dict(run_demo.long_stages(out, seed))
    s1 = _config(demo["stage 1: image tokenizer"])
    s2 = _config(demo["stage 2: unified transformer"])
    s2_long = _config(long["stage 2, 2000 steps longer"])
    train_codes = _arg(demo["code shards (train)"], "--out")
    dev_codes = _arg(demo["code shards (dev)"], "--out")
    assert s1.Global.output_dir == f"{out}/vqgan"
    # both training stages: data parallel over two one-thread processes, a layout their configs accept
    for cmd, cfg in ((demo["stage 1: image tokenizer"], s1), (demo["stage 2: unified transformer"], s2),
                     (long["stage 2, 2000 steps longer"], s2_long)):
        assert cmd[:2] == ["-m", "paddle.distributed.launch"] and _arg(cmd, "--nproc_per_node") == "2"
        assert _arg(cmd, "--log_dir") == f"{cfg.Global.output_dir}/launch_logs"
        assert cfg.Global.num_threads == 1
        assert _config(cmd + ["-o", "Distributed.world_size=2"]).Distributed.dp_degree == 2
    assert s2.Global.output_dir == f"{out}/vilg"
    assert s2_long.Global.output_dir == f"{out}/vilg_long"
    assert s2_long.Global.init_weights == s2.Global.output_dir
    for cfg in (s2, s2_long):
        assert cfg.ImageTokenizer.checkpoint == s1.Global.output_dir
        assert (cfg.Data.train.path, cfg.Data.eval.path) == (train_codes, dev_codes)
    expected_seed = 42 if seed is None else seed
    assert s1.Global.seed == s2.Global.seed == s2_long.Global.seed == expected_seed
    assert _arg(demo["report (test split)"], "--out") == out
    assert _arg(long["report (test split)"], "--out") == f"{out}/long"
    assert _config(long["report (test split)"][1:]).Global.output_dir == s2_long.Global.output_dir


def test_long_without_the_demo_says_what_to_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_demo.main(["--long", "--seed", "1", "--out", str(tmp_path / "demo_seed1")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "has no checkpoints" in err and f"tools/run_demo.py --seed 1 --out {tmp_path / 'demo_seed1'}" in err
