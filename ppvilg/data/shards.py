"""VQ code shards: the hand-off between stage 1 and stage 2.

<folder>/index.json describes the set; <folder>/shard_NNNNN.npz holds `codes` (int32 [N, h, w]), `index`
(position in the source split), `text` and `meta` (JSON per item). Shards are written atomically, then the
index, so an interrupted run resumes after its last complete shard.
"""
import hashlib
import io
import json
import os

import numpy as np
import paddle
from tqdm import tqdm

from ppvilg.utils.io import atomic_write_bytes, atomic_write_json
from ppvilg.utils.runtime import get_logger


class ShardError(RuntimeError):
    pass


def weights_digest(model):
    """SHA-256 of a model's parameters and buffers (names and bytes): which weights made a set of codes."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value.numpy()).tobytes())
    return h.hexdigest()


def tokenize_to_shards(model, checkpoint, dataset, out, shard_size, batch_size, num_workers=0, overwrite=False):
    """Encode every image of `dataset` (a ppvilg.data.datasets.PairDataset of images) with the image tokenizer
    `model` (loaded from the folder `checkpoint`) into shards under `out`; resumes an interrupted run."""
    section, image_size = dataset.section, dataset.image_size
    if section.source == "shards":
        raise ShardError("tokenize_images needs an image source (shapes, manifest or coco), not shards")
    log = get_logger()
    f = model.config.downsample
    identity = {"checkpoint": os.path.abspath(checkpoint), "weights_sha256": weights_digest(model),
                "data": section.to_dict(), "image_size": image_size}
    index_path = os.path.join(out, "index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        stale = {k: index.get(k) for k in identity} != identity
        if stale and not overwrite:
            raise ShardError(f"{index_path} was written for another tokenizer (or other weights) or data section; "
                             f"use a new --out folder or --overwrite (found {index.get('checkpoint')}, "
                             f"data {index.get('data')})")
        if stale:
            log.info(f"{out}: replacing shards written with other weights or data")
            for sh in index["shards"]:
                os.remove(os.path.join(out, sh["file"]))
            os.remove(index_path)
            return tokenize_to_shards(model, checkpoint, dataset, out, shard_size, batch_size, num_workers)
        if index["complete"]:
            log.info(f"{out} is already complete")
            return index
    else:
        index = dict(identity, grid=[image_size // f, image_size // f], num_codes=model.config.num_codes,
                     shard_size=shard_size, shards=[], skipped=[], num_items=0, complete=False)
    done = sum(s["source_count"] for s in index["shards"])
    n = len(dataset)
    bar = tqdm(total=n, initial=done, desc="tokenize", disable=None, dynamic_ncols=True)
    loader = paddle.io.DataLoader(paddle.io.Subset(dataset, list(range(done, n))), batch_size=batch_size,
                                  shuffle=False, collate_fn=dataset.collate, num_workers=num_workers)
    codes, idx, texts, metas, skipped, consumed = [], [], [], [], [], 0

    def flush():
        k = len(index["shards"])
        name = f"shard_{k:05d}.npz"
        buf = io.BytesIO()
        np.savez(buf, codes=np.concatenate(codes) if codes else np.zeros([0] + index["grid"], np.int32),
                 index=np.asarray(idx, np.int64), text=np.asarray(texts, dtype=object).astype(str),
                 meta=np.asarray([json.dumps(m, ensure_ascii=False) for m in metas]).astype(str))
        atomic_write_bytes(os.path.join(out, name), buf.getvalue())
        index["shards"].append({"file": name, "count": len(idx), "source_count": consumed})
        index["skipped"] += skipped
        index["num_items"] += len(idx)
        index["complete"] = sum(s["source_count"] for s in index["shards"]) >= n
        atomic_write_json(index_path, index)

    with paddle.no_grad():
        for batch in loader:
            if batch["errors"]:   # an unexpected read error (not a bad image) stops here, in the main process
                raise ShardError(f"reading the data failed: {batch['errors'][0]}")
            for msg in batch["skipped"]:
                log.warning(f"skipped image: {msg}")
            skipped += batch["skipped"]
            consumed += len(batch["skipped"]) + len(batch["text"])
            if "image" in batch:
                ids = batch["index"].numpy().tolist()
                codes.append(model.encode(batch["image"]).numpy().astype(np.int32))
                idx += ids
                texts += batch["text"]
                metas += [dict(dataset.meta(i), qa=dataset.qa(i)) if dataset.qa(i) else dataset.meta(i)
                          for i in ids]
            bar.update(len(batch["skipped"]) + len(batch["text"]))
            if consumed >= shard_size:
                flush()
                codes, idx, texts, metas, skipped, consumed = [], [], [], [], [], 0
    if consumed or not index["complete"]:
        flush()
    bar.close()
    return index


class CodeShards:
    """Read a shard folder: len(), item(i) -> dict(codes=int32 [h, w], text=str, meta=dict, index=int)."""

    def __init__(self, folder):
        path = os.path.join(folder, "index.json")
        if not os.path.isfile(path):
            raise ShardError(f"{folder}: no index.json (write shards with tools/tokenize_images.py)")
        with open(path, encoding="utf-8") as fh:
            self.index = json.load(fh)
        if not self.index["complete"]:
            raise ShardError(f"{folder}: incomplete (tokenize_images.py was interrupted; run it again)")
        self.codes, self.text, self.meta, self.src = [], [], [], []
        for s in self.index["shards"]:
            with np.load(os.path.join(folder, s["file"])) as z:
                self.codes.append(z["codes"])
                self.text += z["text"].tolist()
                self.meta += z["meta"].tolist()
                self.src.append(z["index"])
        self.codes = np.concatenate(self.codes)
        self.src = np.concatenate(self.src)

    def __len__(self):
        return len(self.text)

    def item(self, i):
        return {"codes": self.codes[i], "text": self.text[i], "meta": json.loads(self.meta[i]),
                "index": int(self.src[i])}
