"""Beam search (captions and VQA answers) with and without its early stop, on a trained shapes-demo checkpoint,
side by side in one run:

  python benchmarks/bench_beam.py [--checkpoint output/demo/vilg] [--num 256] [--threads 2] [--rounds 2]

The search stops when every item has beam_size finished hypotheses, no beam is open, or at max_len; since the
early stop also when no open beam can still beat any item's best finished hypothesis
(ppvilg_deploy.decoding.beam_settled). Compared on the `test` images' codes (`--num` of them, the checkpoint's Eval
sampler: beam 3): the captions and one question per image (the report's questions), wall time and decoder forwards
per batch with the early stop against without it (beam_settled replaced by "never"), and the results, which must
be identical (the script exits 1 if not). Random weights would not do: their beams rarely end. The last line is one
JSON object.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from ppvilg.utils.runtime import setup_device  # noqa: E402
import numpy as np  # noqa: E402

import ppvilg_deploy.decoding as decoding  # noqa: E402
from ppvilg.data.shapes import ShapesPairs  # noqa: E402
from ppvilg.inference import ViLGInference  # noqa: E402
from shapes_report import report_questions  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="output/demo/vilg", help="a trained shapes-demo stage 2 (make demo)")
    p.add_argument("--num", type=int, default=256, help="test images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each (the best is kept)")
    a = p.parse_args(argv)
    setup_device("cpu", a.threads)
    if not os.path.isdir(a.checkpoint):
        sys.exit(f"bench_beam: no checkpoint at {a.checkpoint}: run `make demo` first, or pass --checkpoint")
    vilg = ViLGInference.from_checkpoint(a.checkpoint)
    sampler = vilg.sampler
    if sampler.caption_method != "beam":
        sampler = sampler.replace(caption_method="beam")
    data = ShapesPairs("test", a.num, vilg.image_size, "both", 0)
    items = [data.item(i) for i in range(len(data))]
    codes = np.concatenate([vilg.encode([it["image"] for it in items[s:s + 64]]) for s in range(0, len(items), 64)])
    questions = [q["question"] for q in report_questions(items)]
    settled = decoding.beam_settled
    forwards = []

    class Counted:   # counts the decoder forwards of one search
        def __init__(self, dec):
            self.dec = dec

        def __getattr__(self, name):
            return getattr(self.dec, name)

        def logits_at(self, slot):
            forwards[-1] += 1
            return self.dec.logits_at(slot)

    make = vilg.gen.make_decoder
    vilg.gen.make_decoder = lambda *args, **kw: Counted(make(*args, **kw))
    res, out = {}, {}
    for task, question in (("captions", None), ("vqa", questions)):
        for stop in (True, False):
            decoding.beam_settled = settled if stop else (lambda *args: False)
            best = None
            for _ in range(a.rounds):
                forwards.append(0)
                t0 = time.perf_counter()
                r = vilg.gen.image_to_text(codes, sampler, question=question)
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            key = f"{task}_{'early_stop' if stop else 'no_early_stop'}"
            res[f"{key}_s"], res[f"{key}_forwards"], out[stop] = best, forwards[-1], r
        decoding.beam_settled = settled
        same = [x["ids"] for x in out[True]] == [x["ids"] for x in out[False]] and np.allclose(
            [x["score"] for x in out[True]], [x["score"] for x in out[False]])
        res[f"{task}_same_results"] = bool(same)
        res[f"{task}_speedup"] = res[f"{task}_no_early_stop_s"] / res[f"{task}_early_stop_s"]
        print(f"{task:<8} ({len(codes)} images, beam {sampler.beam_size}): early stop "
              f"{res[f'{task}_early_stop_s']:.2f} s / {res[f'{task}_early_stop_forwards']} forwards, without "
              f"{res[f'{task}_no_early_stop_s']:.2f} s / {res[f'{task}_no_early_stop_forwards']} forwards: "
              f"x{res[f'{task}_speedup']:.2f}, same results: {same}", flush=True)
    res.update(num=len(codes), beam_size=sampler.beam_size, threads=a.threads, checkpoint=a.checkpoint)
    print(json.dumps(res))
    if not (res["captions_same_results"] and res["vqa_same_results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
