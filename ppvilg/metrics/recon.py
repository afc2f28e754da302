"""Reconstruction metrics on RGB uint8 images (scikit-image's reference PSNR / SSIM) and codebook statistics."""
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def psnr(a, b):
    """Mean PSNR in dB over a batch of HxWx3 uint8 images (identical images count as 100 dB)."""
    vals = []
    for x, y in zip(a, b):
        vals.append(100.0 if np.array_equal(x, y) else peak_signal_noise_ratio(x, y, data_range=255))
    return float(np.mean(vals))


def ssim(a, b):
    win = min(7, min(a[0].shape[:2]) // 2 * 2 - 1)
    return float(np.mean([structural_similarity(x, y, channel_axis=2, data_range=255, win_size=win)
                          for x, y in zip(a, b)]))


def codebook_stats(counts):
    """counts: histogram of code assignments -> (fraction of codes used, perplexity of the code distribution)."""
    counts = np.asarray(counts, np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return float((counts > 0).mean()), float(np.exp(-(nz * np.log(nz)).sum()))
