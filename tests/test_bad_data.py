"""Bad data never runs code, hangs or blows memory: a corpus of odd and broken images and manifest lines goes
through tools/check_data.py, tokenize_images and a few training steps, every skip named and counted; a
decompression bomb is refused from its header; an unexpected read error stops the run, in the main process,
within seconds."""
import json
import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from conftest import ROOT
from ppvilg.data.images import BadImageError, read_image

TINY = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path, side=30000):
    """A valid PNG under 1 MB whose header declares side x side RGB pixels (all zero rows, deflated)."""
    row = b"\x00" + b"\x00" * (3 * side)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(64)) + comp.flush()   # the first rows; enough to look real
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def huge_jpeg(path, side=40000):
    """A real small JPEG whose frame header (SOF0) is patched to declare side x side pixels."""
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    path.write_bytes(bytes(data))
    return path


def make_corpus(root):
    """(manifest path, {reason: count} of the skips it must produce, number of usable pairs)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = []
    for k in range(6):
        name = f"good{k}.png"
        cv2.imwrite(str(root / name), rng.integers(0, 255, (20 + k, 24, 3), dtype=np.uint8))
        good.append(name)
    cv2.imwrite(str(root / "gray16.png"), (rng.random((18, 18)) * 65535).astype(np.uint16))
    cv2.imwrite(str(root / "rgba.png"), rng.integers(0, 255, (18, 18, 4), dtype=np.uint8))
    good += ["gray16.png", "rgba.png"]
    bomb_png(root / "bomb.png")
    huge_jpeg(root / "huge.jpg")
    (root / "empty.png").write_bytes(b"")
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    (root / "cut.jpg").write_bytes(buf.tobytes()[:200])
    (root / "text.png").write_text("this is not an image")
    (root / "noise.png").write_bytes(rng.integers(0, 255, 3000, dtype=np.uint8).tobytes())
    cv2.imwrite(str(root / "big.png"), rng.integers(0, 255, (120, 120, 3), dtype=np.uint8))   # > 20 kB: over the test's limit
    (root / "folder.png").mkdir()
    lines = [json.dumps({"image": n, "text": f"picture {n}"}) for n in good]
    lines += [json.dumps({"image": n, "text": f"broken {n}"}) for n in
              ("bomb.png", "huge.jpg", "empty.png", "cut.jpg", "text.png", "noise.png", "big.png", "folder.png",
               "missing.png")]
    lines += ['{"image": "good0.png", "text": ', json.dumps({"image": "good1.png", "text": "  "}),
              json.dumps({"image": "../outside.png", "text": "escape"}), json.dumps({"image": "/etc/passwd", "text": "x"})]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expect = {"too many pixels": 2, "empty file": 1, "truncated": 1, "unreadable header": 2, "file too large": 1,
              "missing file": 2, "invalid JSON": 1, "empty caption": 1, "image path outside the manifest's folder": 2}
    return manifest, expect, len(good)


OVERRIDES = ["Data.max_image_bytes=20000", "Data.train.on_bad_line=skip", "Data.train.source=manifest"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("bad") / "corpus")


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_check_data_names_and_counts_every_skip(corpus):
    manifest, expect, n_good = corpus
    r = _run("tools/check_data.py", "-c", TINY, *sum((["-o", o] for o in OVERRIDES), []),
             "-o", f"Data.train.path={manifest}")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["loaded"] == n_good and not result["errors"]
    assert {k: v["count"] for k, v in result["skipped"].items()} == expect
    assert any("bomb.png" in e and "900000000 pixels" in e for e in result["skipped"]["too many pixels"]["examples"])
    assert "skipped (too many pixels): 2" in r.stdout
    # a source that cannot be read at all: exit 2; a bad line without on_bad_line=skip: exit 2 naming the line
    r = _run("tools/check_data.py", "-c", TINY, "-o", "Data.train.source=manifest", "-o",
             f"Data.train.path={manifest.parent / 'nope.jsonl'}")
    assert r.returncode == 2 and "manifest not found" in r.stderr
    r = _run("tools/check_data.py", "-c", TINY, "-o", "Data.train.source=manifest", "-o", f"Data.train.path={manifest}")
    assert r.returncode == 2 and f"{manifest}:18: not valid JSON" in r.stderr


def test_a_decompression_bomb_is_refused_from_its_header_in_little_memory(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(BadImageError, match=r"declares too many pixels; not decoded \(Image size \(900000000 pixels"):
        read_image(bomb)
    with pytest.raises(BadImageError, match="declares too many pixels"):
        read_image(huge_jpeg(tmp_path / "huge.jpg"))
    with pytest.raises(BadImageError, match=r"declares 10000x10000 = 100000000 pixels, more than the limit of 89478485"):
        read_image(bomb_png(tmp_path / "bomb10k.png", side=10000))
    with pytest.raises(BadImageError, match="declares 30x30 = 900 pixels, more than the limit of 500"):
        read_image(bomb_png(tmp_path / "small.png", side=30), max_pixels=500)
    probe = ("import resource, sys; sys.path.insert(0, '.'); from ppvilg.data.images import read_image, BadImageError\n"
             f"try:\n    read_image({str(bomb)!r})\nexcept BadImageError:\n    pass\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = _run("-c", probe)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 1024 * 1024, r.stdout   # KiB: well under 1 GiB (decoding takes 2.7 GB)


def test_training_and_tokenizing_skip_the_bad_entries(corpus, tmp_path):
    from ppvilg.config import load_config
    from ppvilg.checkpoints import read_meta, resolve_checkpoint
    from ppvilg.engine.tasks import build_task
    from ppvilg.engine.trainer import Trainer
    from ppvilg.utils.runtime import seed_everything
    manifest, expect, n_good = corpus
    cfg = load_config(TINY, [f"Global.output_dir={tmp_path / 'run'}", *OVERRIDES, f"Data.train.path={manifest}",
                             "Data.eval.source=manifest", f"Data.eval.path={manifest}", "Data.eval.on_bad_line=skip",
                             "Train.max_steps=6", "Train.batch_size=4"])
    seed_everything(0)
    trainer = Trainer(cfg, build_task(cfg))
    metrics = trainer.fit()
    n_bad_images = 9   # the manifest's lines that name a bad image (the other bad lines never reach the loader)
    assert 0 < len(trainer.skipped_items) <= n_bad_images   # each distinct file counted once, however often seen
    assert metrics["skipped_images"] == n_bad_images and metrics["num_images"] == n_good
    meta, _ = read_meta(resolve_checkpoint(str(tmp_path / "run")))
    assert meta["skipped_images"] == len(trainer.skipped_items)
    r = _run("tools/tokenize_images.py", "-c", TINY, *sum((["-o", o] for o in OVERRIDES), []),
             "-o", f"Data.train.path={manifest}", "-o", f"Global.checkpoint={tmp_path / 'run'}",
             "--out", str(tmp_path / "codes"), "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((tmp_path / "codes" / "index.json").read_text())
    assert index["num_items"] == n_good and len(index["skipped"]) == n_bad_images and index["complete"]


def test_an_unexpected_read_error_stops_the_run_in_seconds(corpus, tmp_path):
    """A failure that is not a bad image (here: the reader raising ValueError, standing in for a bug) must not
    kill the loader thread and leave the main process waiting: the run stops with the message."""
    manifest, _, _ = corpus
    script = f"""
import sys
sys.path.insert(0, '.')
import ppvilg.data.datasets as ds
real = ds.read_image
def failing(path, *a, **k):
    if path.endswith('good3.png'):
        raise ValueError('simulated reader bug')
    return real(path, *a, **k)
ds.read_image = failing
import ppvilg.engine.tasks
from ppvilg.config import load_config
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
cfg = load_config({TINY!r}, ['Global.output_dir={tmp_path}', 'Data.max_image_bytes=20000',
                             'Data.train.on_bad_line=skip', 'Data.train.source=manifest',
                             'Data.train.path={manifest}', 'Train.max_steps=50', 'Train.batch_size=4'])
Trainer(cfg, build_task(cfg)).fit()
"""
    r = _run("-c", script, timeout=90)
    assert r.returncode != 0
    assert "DataError" in r.stderr and "good3.png: ValueError: simulated reader bug" in r.stderr, r.stderr[-2000:]
