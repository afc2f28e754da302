"""Stage-2 training step time on the demo model (the `shapes` preset, random weights), in one run:

  python benchmarks/bench_train.py [--batch 32] [--steps 10] [--threads 2] [--compare-hidden 128]

Each step is one forward over the batch's sequences (text->image and image->text, and VQA for half the pairs
when asked), backward and an AdamW update, with the shapes data's own captions, questions and answers. Compared:
the text head over every target slot (loss_only off) against the head on the labelled slots only (loss_only, what
training runs), with and without VQA; and, for the two-direction loss_only step, the CPU kernel choices of
training (ppvilg.utils.runtime.training_kernels, ppvilg.models.vilg.Linear) against Paddle's defaults: stride
kernels on / off, and the bias gradient of paddle.nn.Linear against Linear's ones @ grad; the text slots no row
fills cut (ppvilg.models.layout.trim_text, what ViLGTask.losses runs) against the full max_text_len sequences; the
attention masks per head (what ViLG.hidden builds on CPU) against [B, 1, S, S] broadcast over the heads; the last
block on the target slots only (ViLG.forward's `hidden(..., rows)`) against the last block on every slot; the
preset's width (hidden 96) against --compare-hidden (the demo model's width before: 128). Every
step runs under training_kernels (what Trainer does) and cuts the text padding unless said. The last line is one
JSON object.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import setup_device, training_kernels  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from ppvilg.data.shapes import ShapesPairs  # noqa: E402
from ppvilg.engine.vilg_task import PairBatcher  # noqa: E402
from ppvilg.models.layout import trim_text  # noqa: E402
from ppvilg.models.vilg import Linear, ViLG, ViLGConfig  # noqa: E402
from ppvilg.text.tokenizer import TextTokenizer  # noqa: E402


def stage2_step(batch, seed=0, **changes):
    """The demo model (random weights; `changes`: ViLGConfig fields other than the preset's), an AdamW and one
    batch of `batch` shapes pairs with random codes -> (model, step(vqa, loss_only, cut=True) running one training
    step, the sequence lengths seen by kind, (VQA rows, image->text labels, VQA labels))."""
    tok = TextTokenizer()
    c = ViLGConfig(**{**ViLGConfig.PRESETS["shapes"], **changes})
    paddle.seed(seed)
    model = ViLG(c)
    opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
    b = PairBatcher(tok, c)
    data = ShapesPairs("train", batch)
    items = [data.item(i) for i in range(batch)]
    codes = np.random.default_rng(seed).integers(0, c.num_codes, [batch, c.grid, c.grid])
    texts = [it["text"] for it in items]
    rows, qs, ans = b.pick_questions([it["qa"] for it in items], np.random.default_rng(1).random([batch, 2]), 0.5)
    t = paddle.to_tensor
    ids1, v1, l1 = b.text_to_image(codes, texts)
    ids2, v2, l2 = b.image_to_text(codes, texts)
    ids3, v3, l3 = b.vqa(codes[rows], qs, ans)
    directions = [(b.t2i, ids1, v1, l1), (b.i2t, ids2, v2, l2), (b.vqa_layout, ids3, v3, l3)]
    lengths = {}

    def step(vqa, loss_only, cut=True):
        seqs = [[], [], [], []]
        for lay, ids, valid, labels in directions[:3 if vqa else 2]:
            if cut:   # what ViLGTask.losses runs: the text slots no row fills are cut
                lay, keep, labels = trim_text(lay, valid, labels)
                ids, valid = ids[:, keep], valid[:, keep]
            lengths[(lay.kinds, cut)] = lay.length
            for part, x in zip(seqs, (t(ids), valid, lay, t(labels))):
                part.append(x)
        out = model(*seqs, loss_only=loss_only)
        loss = sum(o[1] for o in out)
        loss.backward()
        opt.step()
        opt.clear_grad()

    return model, step, lengths, (rows, l2, l3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-hidden", type=int, default=128,
                   help="the width the preset's is timed against (the demo model's before: 128)")
    a = p.parse_args(argv)
    setup_device("cpu", a.threads)
    model, step, lengths, (rows, l2, l3) = stage2_step(a.batch)

    def timed(vqa, loss_only, cut=True, run=step):
        run(vqa, loss_only, cut)   # warm-up
        t0 = time.perf_counter()
        for _ in range(a.steps):
            run(vqa, loss_only, cut)
        return (time.perf_counter() - t0) / a.steps * 1e3

    results = {}
    for vqa in (False, True):
        for loss_only in (False, True):
            with training_kernels():
                ms = timed(vqa, loss_only)
            key = f"{'with_vqa' if vqa else 'two_directions'}_{'loss_only' if loss_only else 'full_head'}_ms"
            results[key] = ms
            print(f"{key:<36} {ms:8.1f} ms per step", flush=True)
    with training_kernels():
        results["full_text_slots_ms"] = timed(False, True, cut=False)
        results["full_text_slots_with_vqa_ms"] = timed(True, True, cut=False)
        model.layer_masks = lambda layout, valid, dtype, heads: ViLG.layer_masks(model, layout, valid, dtype, 1)
        results["broadcast_masks_ms"] = timed(False, True)   # masks [B, 1, S, S], broadcast over the heads
        del model.layer_masks
        # two variants at a time in alternating rounds (medians): their differences are a few percent to a few
        # tens, and the machine drifts by as much within minutes
        def alternating(variants):
            """{result key: function(vqa) timing one round} -> those keys' medians over 6 rounds, per direction
            set (the keys get '_two_directions_ms' / '_with_vqa_ms')."""
            for vqa, key in ((False, "two_directions"), (True, "with_vqa")):
                names = list(variants)
                rounds = {name: [] for name in names}
                for r in range(6):
                    for name in (names if r % 2 == 0 else names[::-1]):
                        rounds[name].append(variants[name](vqa))
                for name, ms in rounds.items():
                    results[f"{name}_{key}_ms"] = float(np.median(ms))

        # the last block on every slot (then the target slots cut from its output) against the target slots only
        full = model.hidden

        def all_slots(ids, valid, layout, rows=None):
            return full(ids, valid, layout) if rows is None else full(ids, valid, layout)[:, rows]

        def with_hidden(fn):
            def measure(vqa):
                model.hidden = fn
                return timed(vqa, True)
            return measure

        alternating({"last_block_targets": with_hidden(full), "last_block_all_slots": with_hidden(all_slots)})
        del model.hidden
        # the preset's width against --compare-hidden (the same data and steps)
        hidden = ViLGConfig.PRESETS["shapes"]["hidden_size"]
        other = stage2_step(a.batch, hidden_size=a.compare_hidden)[1]
        alternating({f"hidden_{hidden}": lambda vqa: timed(vqa, True),
                     f"hidden_{a.compare_hidden}": lambda vqa: timed(vqa, True, run=other)})
    for key in ("full_text_slots_ms", "full_text_slots_with_vqa_ms", "broadcast_masks_ms",
                "last_block_targets_two_directions_ms", "last_block_all_slots_two_directions_ms",
                "last_block_targets_with_vqa_ms", "last_block_all_slots_with_vqa_ms",
                f"hidden_{hidden}_two_directions_ms", f"hidden_{a.compare_hidden}_two_directions_ms",
                f"hidden_{hidden}_with_vqa_ms", f"hidden_{a.compare_hidden}_with_vqa_ms"):
        print(f"{key:<36} {results[key]:8.1f} ms per step", flush=True)

    linears = [m for m in model.sublayers() if type(m) is Linear]
    for m in linears:   # paddle.nn.Linear's own forward: its bias gradient by Paddle's broadcast-add backward
        m.__class__ = paddle.nn.Linear
    results["paddle_linear_stride_kernels_ms"] = timed(False, True)      # Paddle's defaults throughout
    with training_kernels():
        results["paddle_linear_ms"] = timed(False, True)
    for m in linears:
        m.__class__ = Linear
    results["stride_kernels_ms"] = timed(False, True)                    # Linear, stride kernels on
    base = results["paddle_linear_stride_kernels_ms"]
    for key in ("paddle_linear_stride_kernels_ms", "paddle_linear_ms", "stride_kernels_ms"):
        print(f"{key:<36} {results[key]:8.1f} ms per step", flush=True)
    results["training_kernels_speedup"] = base / results["two_directions_loss_only_ms"]
    results["stride_kernels_off_speedup"] = base / results["paddle_linear_ms"]
    results["linear_bias_grad_speedup"] = results["paddle_linear_ms"] / results["two_directions_loss_only_ms"]
    results["loss_only_speedup"] = results["two_directions_full_head_ms"] / results["two_directions_loss_only_ms"]
    results["loss_only_speedup_with_vqa"] = results["with_vqa_full_head_ms"] / results["with_vqa_loss_only_ms"]
    results["vqa_cost_loss_only"] = results["with_vqa_loss_only_ms"] / results["two_directions_loss_only_ms"]
    results["text_cut_speedup"] = results["full_text_slots_ms"] / results["two_directions_loss_only_ms"]
    results["text_cut_speedup_with_vqa"] = results["full_text_slots_with_vqa_ms"] / results["with_vqa_loss_only_ms"]
    results["per_head_masks_speedup"] = results["broadcast_masks_ms"] / results["two_directions_loss_only_ms"]
    for key in ("two_directions", "with_vqa"):
        results[f"last_block_targets_speedup_{key}"] = (results[f"last_block_all_slots_{key}_ms"]
                                                        / results[f"last_block_targets_{key}_ms"])
        results[f"hidden_{hidden}_speedup_{key}"] = (results[f"hidden_{a.compare_hidden}_{key}_ms"]
                                                     / results[f"hidden_{hidden}_{key}_ms"])
    results["sequence_lengths"] = {f"{'+'.join(map(str, kinds))}{'' if cut else '_full'}": n
                                   for (kinds, cut), n in lengths.items()}
    results.update(batch=a.batch, steps=a.steps, threads=a.threads, vqa_rows=len(rows),
                   labelled_text_slots=int((l2 >= 0).sum() + (l3 >= 0).sum()),
                   text_slots=int(l2.size + l3.size))
    print(f"loss_only: x{results['loss_only_speedup']:.2f} (two directions), x{results['loss_only_speedup_with_vqa']:.2f} "
          f"(with VQA); VQA for {len(rows)} of {a.batch} pairs costs x{results['vqa_cost_loss_only']:.2f}")
    print(f"text slots no row fills cut: x{results['text_cut_speedup']:.2f} (two directions), "
          f"x{results['text_cut_speedup_with_vqa']:.2f} (with VQA); masks per head instead of broadcast: "
          f"x{results['per_head_masks_speedup']:.2f}")
    print(f"the last block on the target slots only (alternating rounds): "
          f"x{results['last_block_targets_speedup_two_directions']:.2f} (two directions), "
          f"x{results['last_block_targets_speedup_with_vqa']:.2f} (with VQA)")
    print(f"the demo model (hidden {hidden}) against hidden {a.compare_hidden} (alternating rounds): "
          f"x{results[f'hidden_{hidden}_speedup_two_directions']:.2f} (two directions), "
          f"x{results[f'hidden_{hidden}_speedup_with_vqa']:.2f} (with VQA)")
    print(f"training kernels against Paddle's defaults: x{results['training_kernels_speedup']:.2f} (stride kernels "
          f"off x{results['stride_kernels_off_speedup']:.2f}, then Linear's bias gradient "
          f"x{results['linear_bias_grad_speedup']:.2f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
