import os

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg.config import ConfigError, load_config
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.engine.vilg_task import PairBatcher
from ppvilg.models.layout import image_to_text, layer_pattern, pattern_mask, text_to_image, trim_text, vqa
from ppvilg.models.vilg import ViLG, ViLGConfig, count_parameters
from ppvilg.text.tokenizer import TextTokenizer
from ppvilg.utils.runtime import seed_everything

TINY = os.path.join(ROOT, "configs/tests/vilg_tiny.yaml")


def _model(attention="dense", layers=2, kernel="matmul"):
    paddle.seed(0)
    m = ViLG(ViLGConfig(**dict(ViLGConfig.PRESETS["tiny"], attention=attention, num_layers=layers,
                               attention_kernel=kernel)))
    m.eval()
    return m


def _ids(layout, seed=0, vocab=60):
    return np.random.default_rng(seed).integers(0, vocab, [2, layout.length]).astype(np.int64)


def _hidden(m, ids, valid, layout):
    return m.hidden(paddle.to_tensor(ids), valid, layout).numpy()


LAYOUTS = {"t2i": text_to_image(16, 8), "i2t": image_to_text(16, 8), "vqa": vqa(8, 8, 8)}


@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hidden_of_the_target_rows_only_equals_the_full_sequence_cut(name, attention):
    """hidden(rows=target) (the last block run on the target slots only, as training's forward does) == the
    target slots of the full sequence's states, and so are the gradients it sends to every parameter; a padded
    key in one row (the masks' row cut must follow)."""
    m, lay = _model(attention), LAYOUTS[name]
    m.train()
    tgt = lay.target_slice()
    ids, valid = paddle.to_tensor(_ids(lay)), np.ones([2, lay.length], bool)
    valid[0, tgt.start - 2] = False
    size = [2, tgt.stop - tgt.start, m.config.hidden_size]
    weights = paddle.to_tensor(np.random.default_rng(1).normal(size=size).astype("float32"))
    outs = []
    for rows in (None, tgt):
        m.clear_gradients()
        h = m.hidden(ids, valid, lay, rows)
        h = h[:, tgt] if rows is None else h
        (h * weights).sum().backward()
        outs.append((h.numpy(), {n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None}))
    (full, g_full), (cut, g_cut) = outs
    np.testing.assert_allclose(cut, full, atol=1e-5, rtol=0)
    assert g_full.keys() == g_cut.keys() and len(g_full) > 10
    for n in g_full:
        scale = max(float(np.abs(g_full[n]).max()), 1e-3)
        np.testing.assert_allclose(g_cut[n] / scale, g_full[n] / scale, atol=1e-5, rtol=0, err_msg=n)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mask_by_perturbation(name, attention):
    m, lay = _model(attention), LAYOUTS[name]
    tgt = lay.target_slice()
    ids, valid = _ids(lay), np.ones([2, lay.length], bool)
    base = _hidden(m, ids, valid, lay)
    t0, t_last = tgt.start, lay.length - 1
    # changing a target token never changes any source output
    changed = ids.copy()
    changed[:, t0 + 3] = (changed[:, t0 + 3] + 7) % 60
    out = _hidden(m, changed, valid, lay)
    np.testing.assert_array_equal(out[:, :t0], base[:, :t0])
    # ... nor an earlier target output, while it does change its own and later ones
    np.testing.assert_array_equal(out[:, t0:t0 + 3], base[:, t0:t0 + 3])
    assert np.abs(out[:, t0 + 3] - base[:, t0 + 3]).max() > 1e-4
    # the source is bidirectional: its last token reaches the output before it (same image row if sparse)
    changed = ids.copy()
    changed[:, t0 - 1] = (changed[:, t0 - 1] + 7) % 60
    out = _hidden(m, changed, valid, lay)
    assert np.abs(out[:, t0 - 2] - base[:, t0 - 2]).max() > 1e-4
    # the last target token influences nothing but itself
    changed = ids.copy()
    changed[:, t_last] = (changed[:, t_last] + 7) % 60
    np.testing.assert_array_equal(_hidden(m, changed, valid, lay)[:, :t_last], base[:, :t_last])


def test_padding_is_invisible():
    m, lay = _model(), LAYOUTS["t2i"]
    ids, valid = _ids(lay), np.ones([2, lay.length], bool)
    valid[:, 10:16] = False  # text slots 10..15 are padding
    base = _hidden(m, ids, valid, lay)
    changed = ids.copy()
    changed[:, 10:16] = 5
    out = _hidden(m, changed, valid, lay)
    keep = np.r_[0:10, 16:lay.length]
    np.testing.assert_array_equal(out[:, keep], base[:, keep])


def test_sparse_patterns_and_schedule():
    assert [layer_pattern(i, 8, "sparse") for i in range(8)] == ["row", "row", "col", "row", "row", "row",
                                                                  "col", "conv"]
    assert {layer_pattern(i, 8, "dense") for i in range(8)} == {"dense"}
    lay = text_to_image(4, 8)  # slots 0..3 text, 4.. image cells 0..63
    img = lambda r, c: 4 + r * 8 + c  # noqa: E731
    row, col, conv = (pattern_mask(lay, 8, p) for p in ("row", "col", "conv"))
    assert row[img(2, 5), img(2, 0)] and not row[img(2, 5), img(1, 5)]
    assert col[img(2, 5), img(0, 5)] and not col[img(2, 5), img(2, 4)]
    assert conv[img(6, 6), img(1, 1)] and not conv[img(7, 7), img(1, 1)]
    assert row[img(3, 3), 0] and col[img(3, 3), 2] and conv[0, img(7, 7)]  # text <-> image stays dense
    # one conv layer over a bidirectional image source: a code 6 rows away does not reach the output
    m, lay = _model("sparse", layers=1), LAYOUTS["i2t"]
    ids, valid = _ids(lay), np.ones([2, lay.length], bool)
    base = _hidden(m, ids, valid, lay)
    changed = ids.copy()
    changed[:, 7 * 8 + 7] = (changed[:, 7 * 8 + 7] + 3) % 60
    out = _hidden(m, changed, valid, lay)
    np.testing.assert_array_equal(out[:, 0], base[:, 0])          # cell (0, 0): out of the 11x11 window
    assert np.abs(out[:, 5 * 8 + 5] - base[:, 5 * 8 + 5]).max() > 1e-4  # cell (5, 5): inside


def test_shared_parameters_get_gradients_from_both_directions():
    paddle.seed(0)
    m = ViLG(ViLGConfig(**ViLGConfig.PRESETS["tiny"]))
    batcher = PairBatcher(TextTokenizer(), m.config)
    codes = np.random.default_rng(0).integers(0, 64, [2, 8, 8])
    texts = ["一个红色圆形", "a blue square"]
    shared = [p for n, p in m.named_parameters() if n.startswith("blocks.")]
    for direction, lay in (("text_to_image", batcher.t2i), ("image_to_text", batcher.i2t)):
        for p in m.parameters():
            p.clear_gradient()
        ids, valid, labels = getattr(batcher, direction)(codes, texts)
        _, loss = m(paddle.to_tensor(ids), valid, lay, paddle.to_tensor(labels))
        loss.backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in shared), direction


def test_text_tokenizer_round_trips_chinese_and_english():
    tok = TextTokenizer()
    for text in ["画面的左上角位置画着一个小的红色圆形", "一只猫坐在窗台上。", "a small red circle at the top left"]:
        ids = tok.encode(text)
        assert ids[-1] == tok.eos_id and tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert len(tok.encode("红" * 50, max_len=16)) == 16
    # encode remembers a text's ids (training meets each caption often): a caller changing its list changes
    # nothing for the next call, and the remembered ids are WordPiece's
    first = tok.encode("一个红色圆形")
    first.append(-1)
    assert tok.encode("一个红色圆形") == tok.tok.convert_tokens_to_ids(tok.tok.tokenize("一个红色圆形")) + [tok.eos_id]


def test_parameter_counts_are_analytic():
    for preset in ("tiny", "shapes"):
        for tie in (False, True):
            c = ViLGConfig(**dict(ViLGConfig.PRESETS[preset], tie_text_head=tie))
            assert sum(p.size for p in ViLG(c).parameters()) == count_parameters(c)
    c10 = ViLGConfig(**ViLGConfig.PRESETS["10b"])
    assert (c10.num_layers, c10.hidden_size, c10.num_heads) == (48, 4096, 64)
    assert 9.5e9 < count_parameters(c10) < 10.5e9
    c300 = ViLGConfig(**ViLGConfig.PRESETS["base_300m"])
    assert (c300.num_layers, c300.hidden_size, c300.num_heads) == (24, 1024, 16)
    assert 2.8e8 < count_parameters(c300) < 3.6e8


def test_vocab_size_must_match_the_vocabulary():
    with pytest.raises(ConfigError, match="Model.text_vocab_size is 100 but the vocabulary"):
        load_config(TINY, ["Model.text_vocab_size=100"])


def test_tiny_vilg_trains_and_both_losses_fall(tiny_shards, tmp_path):
    cfg = load_config(TINY, [f"Global.output_dir={tmp_path}", f"Data.train.path={tiny_shards / 'train'}",
                             f"Data.eval.path={tiny_shards / 'eval'}", "Train.max_steps=40", "Train.batch_size=8",
                             "Loss.cond_dropout=0.1"])
    seed_everything(0)
    trainer = Trainer(cfg, build_task(cfg))
    from ppvilg.data.datasets import build_dataset
    before, _, _ = trainer.task.evaluate(build_dataset(cfg.Data.eval, cfg.Data.image_size))
    metrics = trainer.fit()
    h = trainer.history
    for key in ("t2i_loss", "i2t_loss"):
        first, last = np.mean([x[key] for x in h[:5]]), np.mean([x[key] for x in h[-5:]])
        assert np.isfinite(last) and last < 0.8 * first, (key, first, last)
    for key in ("t2i_loss", "i2t_loss"):  # held-out losses fall too
        assert np.isfinite(metrics[key]) and metrics[key] < before[key], (key, before[key], metrics[key])


def test_condition_dropout_leaves_only_the_end_token():
    batcher = PairBatcher(TextTokenizer(), ViLGConfig(**ViLGConfig.PRESETS["tiny"]))
    codes = np.zeros([2, 8, 8], np.int64)
    ids, valid, _ = batcher.text_to_image(codes, ["红色圆形", "blue"], drop=np.array([True, False]))
    assert valid[0, :16].sum() == 1 and ids[0, 0] == batcher.tok.eos_id
    assert valid[1, :16].sum() == 2 and ids[1, 1] == batcher.tok.eos_id


def test_text_loss_is_the_mean_over_real_tokens():
    """Padding labels (-100) neither add to the loss nor count in its mean (paddle's own 'mean' reduction
    divides by every label, PaddlePaddle/Paddle#48663)."""
    m = _model()
    lay = image_to_text(16, 8)
    ids = _ids(lay)
    labels = np.random.default_rng(3).integers(0, 100, [2, 16])
    labels[0, 5:], labels[1, 9:] = -100, -100
    logits, loss = m(paddle.to_tensor(ids), np.ones([2, lay.length], bool), lay, paddle.to_tensor(labels))
    x = logits.numpy().astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = labels >= 0
    want = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # training's loss_only path runs the text head on the labelled slots only: the same loss and gradients
    m.train()
    grads = []
    for loss_only in (False, True):
        m.clear_gradients()
        out, loss2 = m(paddle.to_tensor(ids), np.ones([2, lay.length], bool), lay, paddle.to_tensor(labels),
                       loss_only=loss_only)
        loss2.backward()
        grads.append({n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None})
        assert (out is None) == loss_only
        np.testing.assert_allclose(float(loss2), want, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:   # float32 sums over many slots in another order: tolerance relative to the tensor's scale
        scale = float(np.abs(grads[0][n]).max())
        np.testing.assert_allclose(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-4 * scale + 1e-9, err_msg=n)


def test_stage2_resume_with_adamw_and_condition_dropout_equals_uninterrupted(tiny_shards, tmp_path):
    """Condition dropout draws from paddle's RNG every step and AdamW keeps moments: both must come back."""
    def cfg(out, *extra):
        return load_config(TINY, [f"Global.output_dir={out}", f"Data.train.path={tiny_shards / 'train'}",
                                  f"Data.eval.path={tiny_shards / 'eval'}", "Train.batch_size=4",
                                  "Loss.cond_dropout=0.5", "Optimizer.name=adamw", "Train.save_every=2",
                                  "Train.max_steps=5", "Train.keep_checkpoints=0", *extra])
    seed_everything(0)
    full = Trainer(cfg(tmp_path / "full"), build_task(cfg(tmp_path / "full")))
    full.fit()
    seed_everything(0)
    c = cfg(tmp_path / "resumed", f"Global.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000002'}")
    resumed = Trainer(c, build_task(c))
    resumed.fit()
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    a, b = full.task.model.state_dict(), resumed.task.model.state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


def test_stage2_evaluation_shows_generated_images_and_captions_in_visualdl(run_dirs, tmp_path):
    """Read back with VisualDL's own reader: held-out losses, a grid generated from the evaluation prompts and
    the captions of the evaluation images (the same prompts / images at every evaluation); and building the
    image tokenizer for the grid mid-run leaves training's random streams alone (a run with the grids equals
    one without)."""
    from visualdl import LogReader

    def run(out, *extra):
        cfg = load_config(TINY, [f"Global.output_dir={out}", f"ImageTokenizer.checkpoint={run_dirs / 'vq'}",
                                 f"Data.train.path={run_dirs / 'codes' / 'train'}",
                                 f"Data.eval.path={run_dirs / 'codes' / 'eval'}", "Train.max_steps=4",
                                 "Train.eval_every=2", "Loss.cond_dropout=0.5", "Eval.num_visuals=4", *extra])
        seed_everything(0)
        trainer = Trainer(cfg, build_task(cfg))
        trainer.fit()
        return trainer

    with_grids = run(tmp_path / "vdl", "Train.vdl=true")
    without = run(tmp_path / "plain", "Eval.num_visuals=0")
    assert [h["loss"] for h in with_grids.history] == [h["loss"] for h in without.history]
    files = [f for f in os.listdir(tmp_path / "vdl" / "vdl") if f.startswith("vdlrecords")]
    reader = LogReader(file_path=str(tmp_path / "vdl" / "vdl" / files[0]))
    tags = reader.get_tags()
    assert {"eval/t2i_loss", "eval/i2t_loss", "train/loss"} <= set(tags["scalar"])
    assert "eval/generated_from_eval_prompts" in tags["image"]
    assert {"eval/captions_of_eval_images", "eval/eval_prompts"} <= set(tags["text"])
    records = reader.get_data("text", "eval/captions_of_eval_images")
    assert [r.id for r in records] == [2, 4]
    text = records[-1].text.encoded_text_string
    assert text.count("truth:") == 4 and text.count("caption:") == 4
    assert len(reader.get_data("image", "eval/generated_from_eval_prompts")) == 2


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_fused_attention_kernel_equals_the_matmul_path(attention):
    """Model.attention_kernel=sdpa (paddle's scaled_dot_product_attention: flash / memory-efficient kernels on
    GPU) gives the matmul path's hidden states, losses and gradients, padding and sparse masks included, and the
    same cached decode."""
    ref, fused = _model(attention), _model(attention, kernel="sdpa")
    lay = LAYOUTS["i2t"]
    ids, valid = _ids(lay), np.ones([2, lay.length], bool)
    valid[1, -5:] = False
    labels = paddle.to_tensor(np.random.default_rng(1).integers(0, 60, [2, lay.lengths[-1]]))
    outs = []
    for m in (ref, fused):
        m.train()
        _, loss = m(paddle.to_tensor(ids), valid, lay, labels)
        loss.backward()
        m.eval()
        outs.append((float(loss), m.blocks[0].attn.q.weight.grad.numpy().copy(), _hidden(m, ids, valid, lay)))
    assert abs(outs[0][0] - outs[1][0]) < 1e-5
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(outs[1][2], outs[0][2], atol=1e-5, rtol=0)
    from ppvilg.generation import Generator
    texts = ["红色圆形", "a blue square"]
    a = Generator(ref, TextTokenizer()).text_to_image(texts, top_k=4, seed=3)
    b = Generator(fused, TextTokenizer()).text_to_image(texts, top_k=4, seed=3)
    np.testing.assert_array_equal(a, b)


def test_linear_bias_gradient_equals_autograd_of_f_linear():
    """ViLG's Linear computes its bias gradient as ones @ grad (Paddle's CPU column reduction is ~60x slower):
    output, input, weight and bias gradients equal F.linear's under autograd, for 2-D and 3-D inputs."""
    from ppvilg.models.vilg import Linear
    rng = np.random.default_rng(0)
    for shape in ([7, 5], [3, 4, 5]):
        paddle.seed(0)
        layer = Linear(5, 6)
        layer.train()
        x = paddle.to_tensor(rng.standard_normal(shape).astype("float32"), stop_gradient=False)
        w = paddle.to_tensor(rng.standard_normal(shape[:-1] + [6]).astype("float32"))
        results = []
        for f in (layer, lambda t: paddle.nn.functional.linear(t, layer.weight, layer.bias)):
            y = f(x)
            (y * w).sum().backward()   # an uneven upstream gradient
            results.append([y.numpy()] + [t.grad.numpy().copy() for t in (x, layer.weight, layer.bias)])
            for t in (x, layer.weight, layer.bias):
                t.clear_gradient()
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.abs(results[0][3]).max() > 0.1   # the bias gradient is not trivially zero


def test_training_kernels_are_scoped_to_the_training_step():
    """Trainer steps run with stride kernels off on CPU (training_kernels); the process setting is restored."""
    from ppvilg.utils.runtime import training_kernels
    flag = "FLAGS_use_stride_kernel"
    before = paddle.get_flags([flag])[flag]
    with training_kernels():
        assert paddle.get_flags([flag])[flag] is False
    assert paddle.get_flags([flag])[flag] == before


def test_training_cuts_text_padding_with_the_same_losses_and_gradients(tiny_shards, tmp_path):
    """ViLGTask.losses drops the text slots no row of the batch fills (trim_text): losses and gradients equal
    those of the full max_text_len sequences, in every direction, VQA included."""
    cfg = load_config(TINY, [f"Global.output_dir={tmp_path}", f"Data.train.path={tiny_shards / 'train'}",
                             f"Data.eval.path={tiny_shards / 'eval'}"])
    task = build_task(cfg)
    m, b = task.model, task.batcher
    m.train()
    codes = np.random.default_rng(0).integers(0, m.config.num_codes, [3, m.config.grid, m.config.grid])
    texts = ["一个红色圆形", "a blue square", "red"]
    vqa = (np.array([0, 2]), ["what colour is it?", "什么形状"], ["red", "圆形"])

    def run(losses):
        m.clear_gradients()
        losses = [x for x in losses if x is not None]
        sum(losses).backward()
        return [float(x) for x in losses], {n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None}

    l_t2i, l_i2t, _, _, l_vqa, _, _ = task.losses(codes, texts, vqa=vqa)
    cut, cut_grads = run([l_t2i, l_i2t, l_vqa])
    seqs = [b.text_to_image(codes, texts), b.image_to_text(codes, texts), b.vqa(codes[vqa[0]], vqa[1], vqa[2])]
    for (ids, valid, _), lay in zip(seqs, (b.t2i, b.i2t, b.vqa_layout)):
        assert trim_text(lay, valid)[0].length < lay.length     # there was padding to cut
    t = paddle.to_tensor
    out = m([t(s[0]) for s in seqs], [s[1] for s in seqs], [b.t2i, b.i2t, b.vqa_layout], [t(s[2]) for s in seqs],
            loss_only=True)
    full, full_grads = run([o[1] for o in out])
    np.testing.assert_allclose(cut, full, rtol=1e-5)
    assert cut_grads.keys() == full_grads.keys()
    for n in full_grads:
        scale = float(np.abs(full_grads[n]).max())
        np.testing.assert_allclose(cut_grads[n], full_grads[n], rtol=1e-4, atol=1e-4 * scale + 1e-9, err_msg=n)
    with pytest.raises(ValueError, match="labels on text slots"):
        ids, valid, labels = seqs[1]
        labels = labels.copy()
        labels[:, -1] = 5
        trim_text(b.i2t, valid, labels)
