"""Datasets built from a `Data.<split>` config section, a deterministic resumable batch order, and the loader.

A bad image never stops a run: the dataset returns a `skipped` marker, the collate function drops it and
reports its message, and the trainer warns once per file and counts distinct files (`skipped_images`).
Any other failure while reading an item (a bug, an unexpected library error) never escapes a loader thread
or worker, where it would leave the main process waiting forever: it travels as an `errors` entry of the
batch, and whoever consumes the batch (`check_batch`) raises it in the main process.
"""
import json

import numpy as np
import paddle

from ppvilg.data.images import MAX_BYTES, MAX_PIXELS, BadImageError, read_image, resize_center_crop, to_tensor_array
from ppvilg.data.corpora import aic_icc, attach_questions, coco_captions, coco_cn
from ppvilg.data.pairs import read_manifest
from ppvilg.data.shapes import ShapesPairs
from ppvilg.data.shards import CodeShards
from ppvilg.utils.runtime import get_logger


class DataError(RuntimeError):
    """An item could not be read for a reason other than a bad image (raised in the main process)."""


def image_limits(data_cfg):
    """The image size limits of a `Data` config section, as keyword arguments of build_dataset."""
    return {"max_pixels": data_cfg.max_image_pixels, "max_bytes": data_cfg.max_image_bytes}


def read_pairs(section):
    """The image-text pairs of a manifest / benchmark `Data.<split>` section (manifests: lines that could not
    be used are skipped or are an error, by section.on_bad_line; see read_pairs_and_bad_lines)."""
    return read_pairs_and_bad_lines(section)[0]


def read_pairs_and_bad_lines(section):
    """(pairs, ["file:line: reason" of each skipped manifest line]); with `questions` (an FMIQA-format JSON)
    its questions join the pairs of the same image (ppvilg.data.corpora.attach_questions)."""
    bad = []
    if section.source == "manifest":
        pairs = read_manifest(section.path, section.get("on_bad_line", "error"),
                              section.get("allow_outside_paths", False), bad)
    elif section.source == "coco":
        pairs = coco_captions(section.path, section.image_root, section.translations)
    elif section.source == "coco_cn":
        pairs = coco_cn(section.path, section.image_root, section.split_file)
    elif section.source == "aic_icc":
        pairs = aic_icc(section.path, section.image_root)
    else:
        raise ValueError(f"source {section.source!r} has no pair list")
    if section.get("questions"):
        pairs = attach_questions(pairs, section.questions, section.get("questions_split"), get_logger())
    return pairs, bad


class PairDataset(paddle.io.Dataset):
    """Image-text pairs as model inputs: dict(image=float32 3xSxS in [-1,1], text=str, index=int), or
    dict(codes=int32 [h, w], text=str, index=int) for a shard folder of VQ codes."""

    def __init__(self, section, image_size, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES):
        self.section, self.image_size = section, int(image_size)
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.source = section.source
        self.shards = self.shapes = self.pairs = None
        self.bad_lines = []
        if section.source == "shards":
            self.shards = CodeShards(section.path)
            n = len(self.shards)
        elif section.source == "shapes":
            self.shapes = ShapesPairs(section.split, section.num_samples, image_size, section.lang, section.seed)
            n = len(self.shapes)
        else:
            self.pairs, self.bad_lines = read_pairs_and_bad_lines(section)
            if not self.pairs:
                raise ValueError(f"{section.path}: no usable image-text pairs in it"
                                 + (f" ({len(self.bad_lines)} lines skipped, e.g. {self.bad_lines[0]})"
                                    if self.bad_lines else ""))
            n = len(self.pairs)
        self.n = min(n, section.limit) if section.limit else n

    def __len__(self):
        return self.n

    def qa(self, i):
        """The questions about item i and their answers: [{"question", "answer", "type"?, ...}] (VQA), or []."""
        if self.shapes is not None:
            return self.shapes.questions(i)
        if self.pairs is not None:
            return self.pairs[i].qa
        return list(self.meta(i).get("qa", []))

    def meta(self, i):
        """What the source knows about item i beyond its text (JSON-able: shapes attributes, manifest fields)."""
        if self.shards is not None:
            return json.loads(self.shards.meta[i])
        if self.shapes is not None:
            return self.shapes.attrs(i)[1]
        return self.pairs[i].meta

    @staticmethod
    def collate(items):
        return collate_pairs(items)

    def name(self, i):
        """What item i is read from (an image path, or the source and index)."""
        return self.pairs[i].image if self.pairs is not None else f"{self.source} item {i}"

    def __getitem__(self, i):
        i = int(i)
        try:
            return self._item(i)
        except BadImageError as e:
            return {"skipped": str(e), "reason": e.reason, "index": i}
        except Exception as e:  # noqa: BLE001  (carried to the main process, which raises it: see check_batch)
            return {"error": f"{self.name(i)}: {type(e).__name__}: {e}", "index": i}

    def _item(self, i):
        if self.shards is not None:
            return {"codes": self.shards.codes[i], "text": self.shards.text[i], "index": i, "qa": self.qa(i)}
        if self.shapes is not None:
            item = self.shapes.item(i)
            return {"image": to_tensor_array(item["image"]), "text": item["text"], "index": i, "qa": item["qa"]}
        pair = self.pairs[i]
        img = resize_center_crop(read_image(pair.image, self.max_pixels, self.max_bytes), self.image_size)
        return {"image": to_tensor_array(img), "text": pair.text, "index": i, "qa": pair.qa}


def collate_pairs(items):
    """Items -> a batch: {"text", "index", "qa" (each item's questions), "image" or "codes", "skipped": [message],
    "skipped_index": [i], "errors": [message]}. Never raises (it may run in a loader thread): a failure becomes an
    error entry."""
    good = [it for it in items if "skipped" not in it and "error" not in it]
    batch = {"skipped": [it["skipped"] for it in items if "skipped" in it],
             "skipped_index": [it["index"] for it in items if "skipped" in it],
             "errors": [it["error"] for it in items if "error" in it],
             "text": [it["text"] for it in good],
             "qa": [it.get("qa", []) for it in good],
             "index": np.array([it["index"] for it in good], np.int64)}
    try:
        for key in ("image", "codes"):
            if good and key in good[0]:
                batch[key] = np.stack([it[key] for it in good])
    except Exception as e:  # noqa: BLE001
        batch["errors"].append(f"items {batch['index'].tolist()}: cannot form a batch: {type(e).__name__}: {e}")
    return batch


def check_batch(batch):
    """Raise the read errors a batch carries (in the main process)."""
    if batch["errors"]:
        more = f" (and {len(batch['errors']) - 1} more)" if len(batch["errors"]) > 1 else ""
        raise DataError(f"reading the data failed: {batch['errors'][0]}{more}")
    return batch


class ResumableBatchSampler(paddle.io.BatchSampler):
    """Endless batches of indices; epoch e is permutation(seed + e). Batch k of the whole stream is a pure
    function of k, so a resumed run starts at `start_batch` and sees exactly what an uninterrupted run saw.
    With world_size > 1 (data-parallel ranks), batch k is cut into world_size equal parts and rank r takes
    part r: together the ranks see what one process sees, so a data-parallel run equals a single one."""

    def __init__(self, n, batch_size, seed, start_batch=0, shuffle=True, rank=0, world_size=1):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} items, fewer than one micro-batch of {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"a batch of {batch_size} cannot be split evenly over {world_size} data-parallel ranks")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.per_epoch = n // batch_size

    def batch(self, k):
        epoch, j = divmod(k, self.per_epoch)
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        return order[j * self.batch_size:(j + 1) * self.batch_size].tolist()

    def __iter__(self):
        k, per = self.start_batch, self.batch_size // self.world_size
        while True:
            yield self.batch(k)[self.rank * per:(self.rank + 1) * per]
            k += 1

    def __len__(self):
        return 2 ** 62


def train_loader(dataset, batch_size, seed, start_batch, num_workers, rank=0, world_size=1):
    """Batches of batch_size / world_size items for data-parallel rank `rank` (see ResumableBatchSampler)."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, start_batch, True, rank, world_size)
    return paddle.io.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs,
                                num_workers=num_workers, return_list=True)


def eval_batches(dataset, batch_size):
    """Sequential batches over the whole dataset (in the main process; eval sets are small)."""
    for s in range(0, len(dataset), batch_size):
        yield check_batch(collate_pairs([dataset[i] for i in range(s, min(len(dataset), s + batch_size))]))


def build_dataset(section, image_size, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES):
    return PairDataset(section, image_size, max_pixels, max_bytes)
