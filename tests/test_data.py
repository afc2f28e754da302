import os
import json
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT
from ppvilg.config import DATASET_DEFAULTS, to_config
from ppvilg.data.datasets import ResumableBatchSampler, build_dataset, collate_pairs
from ppvilg.data.images import BadImageError, read_image, resize_center_crop
from ppvilg.data.pairs import ManifestError, read_coco_captions, read_manifest
from ppvilg.data.shapes import SPLITS, ShapesPairs, all_texts, split_triples
from ppvilg.text.tokenizer import DEFAULT_VOCAB, TextTokenizer


def _png(path, arr):
    assert cv2.imwrite(str(path), arr)
    return path


def test_manifests_resolve_relative_paths_and_name_bad_lines(tmp_path):
    (tmp_path / "imgs").mkdir()
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "imgs/a.png", "text": "一只猫", "lang": "zh"}\n\n{"image": "/abs/b.png", "caption": "dog"}\n',
                 encoding="utf-8")
    skipped = []
    pairs = read_manifest(str(m), skipped=skipped)
    assert len(pairs) == 1 and pairs[0].image == str(tmp_path / "imgs/a.png") and pairs[0].text == "一只猫"
    assert pairs[0].meta == {"lang": "zh"}
    assert skipped == [f"{m}:3: image path '/abs/b.png' is outside the manifest's folder (set "
                       "Data.<split>.allow_outside_paths=true to allow it)"]
    pairs = read_manifest(str(m), allow_outside=True)           # the user's explicit opt-in
    assert pairs[1].image == "/abs/b.png" and pairs[1].text == "dog"
    m.write_text('{"image": "a.png", "text": "x"}\n{"image": "a.png"\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not valid JSON"):
        read_manifest(str(m))
    m.write_text('{"image": "a.png", "txt": "x"}\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: expected string fields"):
        read_manifest(str(m))
    t = tmp_path / "m.tsv"
    t.write_text("image\ttext\tsource\na.png\ta cat\tweb\nb.png\tonly two\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.tsv:3: expected 3 tab-separated fields, got 2"):
        read_manifest(str(t))
    t.write_text("image\ttext\na.png\ta cat\n", encoding="utf-8")
    assert read_manifest(str(t))[0].image == str(tmp_path / "a.png")


def test_bad_manifest_lines_are_skipped_and_named_when_asked(tmp_path):
    (tmp_path / "sub").mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    os.symlink(outside, tmp_path / "sub" / "link.png")
    m = tmp_path / "sub" / "m.jsonl"
    lines = [b'{"image": "a.png", "text": "ok"}', b'{"image": "b.png", "text": "caf\\u00e9"}',
             b'{"image": "c.png", "text": "caf' + bytes([0xE9]) + b'"}', b'{broken', b'{"image": "d.png", "text": "   "}',
             b'{"image": "../secret.txt", "text": "escape"}', b'{"image": "link.png", "text": "via a link"}',
             b'["a list"]', b'{"image": 3, "text": "number"}']
    m.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: not valid UTF-8"):
        read_manifest(str(m))
    skipped = []
    pairs = read_manifest(str(m), on_bad_line="skip", skipped=skipped)
    assert [p.text for p in pairs] == ["ok", "café"]        # (a JSON escape is text, not a bad byte)
    reasons = [s.split(": ", 1)[1] for s in skipped]
    assert [s.split(":")[1] for s in skipped] == ["3", "4", "5", "6", "7", "8", "9"]
    assert reasons[0].startswith("not valid UTF-8") and reasons[1].startswith("not valid JSON")
    assert reasons[2] == "empty caption" and "outside the manifest's folder" in reasons[3]
    assert "outside the manifest's folder" in reasons[4] and reasons[5].startswith("expected a JSON object")


def test_coco_captions_reader(tmp_path):
    data = {"images": [{"id": 7, "file_name": "x.jpg"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": " A cat. "}, {"image_id": 7, "id": 2, "caption": "cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    pairs = read_coco_captions(str(tmp_path / "c.json"), str(tmp_path / "root"))
    assert [p.text for p in pairs] == ["A cat.", "cat"] and pairs[0].image == str(tmp_path / "root/x.jpg")
    data["annotations"].append({"image_id": 8, "caption": "x"})
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="unknown image_id 8"):
        read_coco_captions(str(tmp_path / "c.json"))


def test_image_conversions(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    bgr = rgb[:, :, ::-1]
    assert (read_image(_png(tmp_path / "c.png", bgr)) == rgb).all()
    gray = read_image(_png(tmp_path / "g.png", np.full((5, 5), 77, np.uint8)))
    assert gray.shape == (5, 5, 3) and (gray == 77).all()
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 2] = 255
    bgra[..., 3] = 0  # fully transparent -> white
    bgra[0, 0, 3] = 255  # one opaque red pixel
    out = read_image(_png(tmp_path / "a.png", bgra))
    assert (out[0, 0] == [255, 0, 0]).all() and (out[1, 1] == 255).all()
    sixteen = read_image(_png(tmp_path / "s.png", np.full((3, 3, 3), 65535, np.uint16)))
    assert sixteen.dtype == np.uint8 and (sixteen == 255).all()
    ok, jpg = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    (tmp_path / "x.jpg").write_bytes(jpg.tobytes())
    assert read_image(tmp_path / "x.jpg").shape == (16, 16, 3)


def test_cmyk_jpeg_is_converted(tmp_path):
    from PIL import Image  # pillow comes with scikit-image; only used to *write* a CMYK JPEG fixture
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.shape == (8, 8, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_bad_images_raise_with_the_file_name(tmp_path):
    with pytest.raises(BadImageError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(BadImageError, match="text.png: not an image"):
        read_image(tmp_path / "text.png")
    ok, jpg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    with pytest.raises(BadImageError, match="cut.jpg: truncated"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty"):
        read_image(tmp_path / "empty.png")


def test_bad_images_are_skipped_and_counted(tmp_path):
    _png(tmp_path / "good.png", np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "bad.png").write_text("nope")
    lines = [{"image": "good.png", "text": "a"}, {"image": "bad.png", "text": "b"},
             {"image": "gone.png", "text": "c"}, {"image": "good.png", "text": "d"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = build_dataset(to_config(dict(DATASET_DEFAULTS, source="manifest", path=str(tmp_path / "m.jsonl"))), 16)
    batch = collate_pairs([ds[i] for i in range(4)])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["text"] == ["a", "d"]
    assert len(batch["skipped"]) == 2 and "bad.png" in batch["skipped"][0] and "gone.png" in batch["skipped"][1]


def test_resize_center_crop():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 30:50] = 255  # a bright band in the middle
    out = resize_center_crop(img, 20)
    assert out.shape == (20, 20, 3) and out[:, 10].mean() == 255 and out[:, 0].mean() == 0


def test_shapes_are_deterministic_and_heldout_combinations_unseen():
    a, b = ShapesPairs("train", 50, 32, "both", 3), ShapesPairs("train", 50, 32, "both", 3)
    for i in (0, 17, 49):
        assert (a.item(i)["image"] == b.item(i)["image"]).all() and a.item(i)["text"] == b.item(i)["text"]
    train, held = set(split_triples("train")), set(split_triples("heldout"))
    assert not train & held and len(held) == 18
    for k in range(3):  # every single attribute value still occurs in training
        assert {t[k] for t in held} <= {t[k] for t in train}
    h = ShapesPairs("heldout", 40, 32, "en", 0)
    combos = {(h.item(i)["attrs"]["color"], h.item(i)["attrs"]["shape"], h.item(i)["attrs"]["position"])
              for i in range(40)}
    t = ShapesPairs("train", 300, 32, "en", 0)
    seen = {(t.item(i)["attrs"]["color"], t.item(i)["attrs"]["shape"], t.item(i)["attrs"]["position"])
            for i in range(300)}
    assert combos and not combos & seen
    zh = ShapesPairs("train", 4, 32, "zh", 0).item(0)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh["text"])


def test_the_shapes_vocabulary_encodes_every_shapes_text_as_the_default_one_does():
    """ppvilg/text/assets/shapes_vocab.txt (the demo's Text.vocab_file) is what tools/build_vocab.py --shapes builds
    from the default vocabulary now, and every text of every shapes split, items drawn as training draws them,
    becomes the same tokens under both (no [UNK])."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import build_vocab
    shapes_file = os.path.join(os.path.dirname(DEFAULT_VOCAB), "shapes_vocab.txt")
    with open(shapes_file, encoding="utf-8") as f:
        assert f.read().split("\n")[:-1] == build_vocab.shapes_vocab(DEFAULT_VOCAB)
    full, small = TextTokenizer(DEFAULT_VOCAB), TextTokenizer(shapes_file)
    assert small.vocab_size < 120 and (small.pad_id, small.bos_id, small.eos_id) == (full.pad_id, full.bos_id,
                                                                                     full.eos_id)
    texts = set(all_texts())
    for split in SPLITS:
        data = ShapesPairs(split, 40, 32, "both", 1)
        for i in range(40):
            item = data.item(i)
            drawn = [item["text"]] + [t for qa in item["qa"] for t in (qa["question"], qa["answer"])]
            assert set(drawn) <= texts, split
    for text in texts:
        as_full, as_small = full.tok.tokenize(text), small.tok.tokenize(text)
        assert as_small == as_full and small.unk_id not in small.encode(text), text


def test_batch_order_resumes_exactly():
    full = ResumableBatchSampler(10, 3, seed=5)
    stream = [b for b, _ in zip(full, range(8))]
    resumed = ResumableBatchSampler(10, 3, seed=5, start_batch=5)
    assert [b for b, _ in zip(resumed, range(3))] == stream[5:8]
    assert len(set(sum(stream[:3], []))) == 9  # one epoch = 3 batches of distinct indices
    single = [b for b, _ in zip(ResumableBatchSampler(10, 4, 5), range(3))]
    r0 = [b for b, _ in zip(ResumableBatchSampler(10, 4, 5, rank=0, world_size=2), range(3))]
    r1 = [b for b, _ in zip(ResumableBatchSampler(10, 4, 5, rank=1, world_size=2), range(3))]
    assert [a + b for a, b in zip(r0, r1)] == single  # data-parallel ranks split each batch of one process
    with pytest.raises(ValueError, match="split evenly"):
        ResumableBatchSampler(10, 3, 5, rank=0, world_size=2)
