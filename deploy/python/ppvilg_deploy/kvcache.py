"""Writing a decode step's keys and values into a preallocated KV cache in place, for the dynamic-graph decoder
(ppvilg.models.vilg.Attention) and the exported predictors (ppvilg_deploy.predictor) alike.

A cache is one tensor [B, H, S, Dh] per layer and per keys / values; a step brings [B, H, s, Dh] for slots
start .. start+s-1. Paddle's slice assignment (`cache[:, :, start:start + s] = new`, the set_value kernel) costs
about as much as writing ~20 times the data on CPU: 1.3 ms for one slot at 1024 rows of the demo model, which
made it ~20% of a text->image decode step. Here the slots are written as rows of the cache's [B * H * S, Dh]
view (a reshape of a contiguous tensor shares its memory) by `paddle.scatter_`: 0.07 ms for the same write
(benchmarks/bench_decode_step.py times both)."""
import numpy as np


def slot_rows(batch, heads, length, start, count):
    """int64 [batch * heads * count]: the rows of a [batch * heads * length, Dh] view of a cache that hold slots
    start .. start+count-1, in the order of a [batch, heads, count, Dh] tensor's rows."""
    if start < 0 or start + count > length:
        raise ValueError(f"slots {start} .. {start + count - 1} do not fit a cache of {length} slots")
    base = np.arange(batch * heads, dtype=np.int64)[:, None] * length
    return (base + np.arange(start, start + count, dtype=np.int64)).reshape(-1)


def write_slots(caches, start, new, rows=None):
    """Write new[i] [B, H, s, Dh] into caches[i] [B, H, S, Dh] (contiguous) at slots start .. start+s-1, in place
    (every tensor on one device, one dtype). rows: slot_rows(...) as a tensor, when the caller reuses it."""
    import paddle
    b, h, length, dh = caches[0].shape
    s = new[0].shape[2]
    if rows is None:
        rows = paddle.to_tensor(slot_rows(b, h, length, start, s), place=caches[0].place)
    elif rows.shape[0] != b * h * s:
        raise ValueError(f"rows name {rows.shape[0]} cache rows, slots {start} .. {start + s - 1} of a "
                         f"[{b}, {h}, {length}, {dh}] cache are {b * h * s}")
    for cache, kv in zip(caches, new):
        if kv.shape != [b, h, s, dh] or cache.shape != [b, h, length, dh]:
            raise ValueError(f"cannot write keys / values of shape {list(kv.shape)} into a cache of shape "
                             f"{list(cache.shape)}")
        if not cache.is_contiguous():   # its reshape would be a copy, and the write would be lost
            raise ValueError("write_slots writes through the cache's flat view: the cache must be a contiguous "
                             "tensor (not a slice or transpose of one)")
        paddle.scatter_(cache.reshape([-1, dh]), rows, kv.reshape([-1, dh]), overwrite=True)
