"""Fine-tuning from a trained checkpoint: LoRA adapters (exact parameter count, start equal to the base model,
merged == adapted), freezing by name, the adapter tools, and growing the text vocabulary."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg import checkpoints as ckpt
from ppvilg.config import ConfigError, load_config
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.models.layout import text_to_image
from ppvilg.models.lora import LoRALinear, lora_state, merge_lora
from ppvilg.models.vilg import ViLG, ViLGConfig, count_parameters
from ppvilg.text.tokenizer import TextTokenizer
from ppvilg.utils.runtime import seed_everything

TINY = os.path.join(ROOT, "configs/tests/vilg_tiny.yaml")


def _logits(model, seed=0):
    lay = text_to_image(16, 8)
    ids = np.random.default_rng(seed).integers(0, 60, [2, lay.length]).astype(np.int64)
    with paddle.no_grad():
        return model(paddle.to_tensor(ids), np.ones(ids.shape, bool), lay)[0].numpy()


def _plain_and_lora(rank=4, targets=None):
    c = ViLGConfig(**ViLGConfig.PRESETS["tiny"])
    extra = {"lora_rank": rank, **({"lora_targets": targets} if targets else {})}
    cl = ViLGConfig(**dict(ViLGConfig.PRESETS["tiny"], **extra))
    paddle.seed(0)
    base = ViLG(c)
    paddle.seed(1)
    adapted = ViLG(cl)
    state = adapted.state_dict()
    adapted.set_state_dict({k: v for k, v in base.state_dict().items()} | lora_state(state))
    base.eval(), adapted.eval()
    return base, adapted, c, cl


def test_lora_adds_exactly_rank_times_in_plus_out_per_adapted_projection():
    base, adapted, c, cl = _plain_and_lora(rank=4)
    d, f = 64, 256   # the tiny preset: hidden 64, ffn 4x, 2 layers
    per_layer = 4 * 4 * (d + d) + 4 * (d + f) + 4 * (f + d)   # q, k, v, proj; mlp.0; mlp.2
    n_base = sum(int(p.size) for p in base.parameters())
    n_adapted = sum(int(p.size) for p in adapted.parameters())
    assert n_adapted - n_base == 2 * per_layer == count_parameters(cl) - count_parameters(c)
    names = [n for n, _ in adapted.named_parameters() if "lora" in n]
    assert len(names) == 2 * 6 * 2 and "blocks.1.mlp.2.lora_B" in names
    # base names are unchanged, and only the adapters train
    assert {n for n, _ in base.named_parameters()} == {n for n, _ in adapted.named_parameters() if "lora" not in n}
    assert {n for n, p in adapted.named_parameters() if not p.stop_gradient} == set(names)
    _, only_q, _, cq = _plain_and_lora(rank=2, targets="attn.q")
    assert sum(int(p.size) for p in only_q.parameters()) - n_base == 2 * 2 * (d + d) == count_parameters(cq) - count_parameters(c)
    with pytest.raises(ValueError, match="matches no linear layer"):
        ViLG(ViLGConfig(**dict(ViLGConfig.PRESETS["tiny"], lora_rank=2, lora_targets="attn.qq")))


def test_lora_starts_equal_to_the_base_model_and_merges_into_plain_weights():
    base, adapted, c, cl = _plain_and_lora(rank=4)
    np.testing.assert_array_equal(_logits(adapted), _logits(base))
    rng = np.random.default_rng(0)
    for name, p in adapted.named_parameters():   # as if trained: non-zero B
        if name.endswith("lora_B"):
            p.set_value(rng.normal(0, 0.05, p.shape).astype(np.float32))
    changed = _logits(adapted)
    assert np.abs(changed - _logits(base)).max() > 1e-3
    merged = ViLG(c)
    merged.set_state_dict(merge_lora({k: v.numpy() for k, v in adapted.state_dict().items()}, 4, cl.lora_alpha))
    merged.eval()
    np.testing.assert_allclose(_logits(merged), changed, atol=2e-5, rtol=1e-5)
    # the merge is W + A B * alpha / r, by hand for one projection
    q = adapted.blocks[0].attn.q
    assert isinstance(q, LoRALinear)
    want = q.weight.numpy() + q.lora_A.numpy() @ q.lora_B.numpy() * (cl.lora_alpha / 4)
    np.testing.assert_allclose(merged.blocks[0].attn.q.weight.numpy(), want, rtol=1e-5, atol=1e-7)


def _finetune_cfg(run_dirs, out, *extra):
    return load_config(TINY, [f"Global.output_dir={out}", f"Global.init_weights={run_dirs / 'vilg'}",
                              f"ImageTokenizer.checkpoint={run_dirs / 'vq'}",
                              f"Data.train.path={run_dirs / 'codes' / 'train'}",
                              f"Data.eval.path={run_dirs / 'codes' / 'eval'}", "Train.max_steps=3",
                              "Train.batch_size=4", "Eval.num_visuals=0", "Optimizer.lr=1e-2", *extra])


def _weights(folder):
    return ckpt.read_full_state(ckpt.resolve_checkpoint(str(folder)))


def test_lora_training_changes_only_the_adapters(run_dirs, tmp_path):
    cfg = _finetune_cfg(run_dirs, tmp_path / "lora", "Model.lora_rank=4")
    seed_everything(0)
    Trainer(cfg, build_task(cfg)).fit()
    before, after = _weights(run_dirs / "vilg"), _weights(tmp_path / "lora")
    assert set(after) - set(before) == {k for k in after if "lora" in k}
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert np.abs(after["blocks.0.attn.q.lora_B"]).max() > 0           # B left zero: the adapter learned
    # with Train.trainable the text embedding trains too
    cfg = _finetune_cfg(run_dirs, tmp_path / "lora_emb", "Model.lora_rank=4", "Train.trainable=[model.text_emb.weight]")
    seed_everything(0)
    Trainer(cfg, build_task(cfg)).fit()
    emb = _weights(tmp_path / "lora_emb")
    assert not np.array_equal(emb["text_emb.weight"], before["text_emb.weight"])
    np.testing.assert_array_equal(emb["blocks.0.mlp.0.weight"], before["blocks.0.mlp.0.weight"])


def test_frozen_parameters_do_not_change(run_dirs, tmp_path):
    cfg = _finetune_cfg(run_dirs, tmp_path, "Train.frozen=[model.blocks.0.*, model.text_emb.weight]")
    seed_everything(0)
    Trainer(cfg, build_task(cfg)).fit()
    before, after = _weights(run_dirs / "vilg"), _weights(tmp_path)
    frozen = [k for k in before if k.startswith("blocks.0.") or k == "text_emb.weight"]
    assert len(frozen) > 10
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert not np.array_equal(after["blocks.1.attn.q.weight"], before["blocks.1.attn.q.weight"])
    cfg = _finetune_cfg(run_dirs, tmp_path / "typo", "Train.trainable=[model.blokcs.*]")
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(cfg, build_task(cfg))
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(TINY, ["Model.lora_rank=2", "Distributed.pp_degree=2"])


def _tool(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_adapter_files_merge_and_apply_to_the_same_weights(run_dirs, tmp_path):
    cfg = _finetune_cfg(run_dirs, tmp_path / "lora", "Model.lora_rank=2")
    seed_everything(0)
    Trainer(cfg, build_task(cfg)).fit()
    out = _tool("tools/lora.py", "extract", str(tmp_path / "lora"), "--out", str(tmp_path / "a.lora.safetensors"))
    assert out["tensors"] == 2 * 6 * 2 and out["rank"] == 2
    tensors, info = ckpt.read_adapter(str(tmp_path / "a.lora.safetensors"))
    assert info["lora_rank"] == 2 and set(tensors) == {k for k in _weights(tmp_path / "lora") if "lora" in k}
    _tool("tools/lora.py", "merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged"))
    _tool("tools/lora.py", "apply", str(run_dirs / "vilg"), str(tmp_path / "a.lora.safetensors"),
          "--out", str(tmp_path / "applied"))
    merged, applied = _weights(tmp_path / "merged"), _weights(tmp_path / "applied")
    assert set(merged) == set(applied) == set(_weights(run_dirs / "vilg"))
    for k in merged:
        np.testing.assert_array_equal(merged[k], applied[k], err_msg=k)
    # the merged checkpoint is a plain model that generates what the adapted one does
    from ppvilg.inference import ViLGInference
    a, b = ViLGInference.from_checkpoint(str(tmp_path / "lora")), ViLGInference.from_checkpoint(str(tmp_path / "merged"))
    assert b.model.config.lora_rank == 0
    np.testing.assert_array_equal(b.gen.text_to_image(["红色圆形"], temperature=0.0),
                                  a.gen.text_to_image(["红色圆形"], temperature=0.0))
    with pytest.raises(ckpt.CheckpointError, match="not a ppvilg LoRA adapter"):
        ckpt.read_adapter(str(ckpt.resolve_checkpoint(str(run_dirs / "vilg"))) + "/model.safetensors")


def test_growing_the_vocabulary_keeps_old_rows_bit_identical(run_dirs, tmp_path):
    manifest = tmp_path / "m.jsonl"
    (tmp_path / "x.png").write_bytes(b"")
    manifest.write_text('{"image": "x.png", "text": "a 😀 circle", "question": "what?", "answer": "🙂"}\n',
                        encoding="utf-8")
    out = _tool("tools/add_tokens.py", str(run_dirs / "vilg"), "--tokens", "diamond", "--manifest", str(manifest),
                "--out", str(tmp_path / "grown"))
    before, after = _weights(run_dirs / "vilg"), _weights(tmp_path / "grown")
    old = TextTokenizer(None)
    assert out["added"] == ["diamond", "😀", "🙂"] and out["ids"] == [old.vocab_size + k for k in range(3)]
    v = before["text_emb.weight"].shape[0]
    assert after["text_emb.weight"].shape[0] == out["text_vocab_size"] >= old.vocab_size + 3
    np.testing.assert_array_equal(after["text_emb.weight"][:v], before["text_emb.weight"])
    np.testing.assert_array_equal(after["text_head.weight"][:, :v], before["text_head.weight"])
    np.testing.assert_array_equal(after["text_bias"][:v], before["text_bias"])
    for k in before:
        if not k.startswith(("text_emb", "text_head", "text_bias")):
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # "diamond" is one token now, its row the mean of the pieces it was cut into
    new = TextTokenizer(out["vocab_file"])
    pieces = old.encode("diamond")[:-1]
    assert new.encode("diamond") == [out["ids"][0], new.eos_id] and new.encode("😀")[0] != new.unk_id
    np.testing.assert_allclose(after["text_emb.weight"][out["ids"][0]], before["text_emb.weight"][pieces].mean(0),
                               rtol=1e-6)
    # fine-tuning starts from it
    cfg = _finetune_cfg(run_dirs, tmp_path / "ft", f"Global.init_weights={tmp_path / 'grown'}",
                        f"Text.vocab_file={out['vocab_file']}", f"Model.text_vocab_size={out['text_vocab_size']}",
                        "Train.max_steps=1")
    seed_everything(0)
    Trainer(cfg, build_task(cfg)).fit()
