"""Frechet Inception Distance: feature statistics in float64 and the Frechet distance through scipy.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the matrix square root from scipy.linalg.sqrtm
(its tiny imaginary part from round-off dropped; a non-finite product is retried with eps on the diagonals,
as the reference implementation does). Statistics of an image set can be cached in an .npz keyed by a
fingerprint of the set, so the 30k real images of MS-COCO are featurised once.
"""
import hashlib
import json
import os

import numpy as np
from scipy import linalg

from ppvilg.utils.io import atomic_write_bytes


def statistics(features):
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape} vs {mu2.shape}, {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm gave a large imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fingerprint(items):
    """A stable key for an image set: file paths with sizes and mtimes, or any JSON-able description."""
    desc = []
    for it in items:
        if isinstance(it, str) and os.path.isfile(it):
            st = os.stat(it)
            desc.append([os.path.abspath(it), st.st_size, int(st.st_mtime)])
        else:
            desc.append(it)
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_statistics(cache_dir, key, compute):
    """(mu, sigma) from <cache_dir>/fid_stats_<key>.npz, or compute() -> features, then store them."""
    path = os.path.join(cache_dir, f"fid_stats_{key}.npz") if cache_dir else None
    if path and os.path.isfile(path):
        with np.load(path) as z:
            return z["mu"], z["sigma"], True
    mu, sigma = statistics(compute())
    if path:
        import io
        buf = io.BytesIO()
        np.savez(buf, mu=mu, sigma=sigma)
        atomic_write_bytes(path, buf.getvalue())
    return mu, sigma, False
