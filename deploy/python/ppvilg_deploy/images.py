"""Images for training and deployment alike: safe reading (`read_image`), the paper's preprocessing (resize the
short side, then center-crop), the [-1, 1] range of the image tokenizer, and back to RGB uint8.

`read_image` returns an RGB uint8 array or raises BadImageError naming the file and the reason. Grayscale,
RGBA/LA (alpha composited onto white), 16-bit and CMYK JPEGs (OpenCV's decoder converts them) are converted.
Before anything is decoded, the file's size and the pixel count its header declares (read by Pillow, which
parses headers lazily) are checked against limits (`Data.max_image_bytes`, `Data.max_image_pixels` in
training): a decompression bomb is refused without the memory it would take. A missing, empty, truncated,
oversized or undecodable file, a format whose header Pillow cannot read, and any decoder error raise
BadImageError; datasets catch it, warn, skip and count.
"""
import io
import os
import warnings

import cv2
import numpy as np

class BadImageError(Exception):
    """An image that cannot be used; `reason` is a short category (tools/check_data.py groups by it)."""

    def __init__(self, message, reason="unreadable"):
        super().__init__(message)
        self.reason = reason


def _truncated(path, data):
    """JPEG must end with the EOI marker, PNG must contain IEND: OpenCV decodes cut files silently."""
    if data[:3] == b"\xff\xd8\xff":
        return data.rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


MAX_PIXELS = 89478485          # Pillow's decompression-bomb limit; Data.max_image_pixels
MAX_BYTES = 256 * 1024 * 1024  # Data.max_image_bytes


def header_size(data, name):
    """(width, height) that an image's header declares, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # Pillow's own bomb warning: we apply our limit below
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as e:   # beyond twice Pillow's own limit: refused while reading the header
        raise BadImageError(f"{name}: its header declares too many pixels; not decoded ({e})",
                            "too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImageError(f"{name}: not an image whose header can be read ({type(e).__name__}: {e})",
                            "unreadable header") from None


def read_image(path, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadImageError(f"{path}: no such file", "missing file")
    n_bytes = os.path.getsize(path)
    if n_bytes > max_bytes:
        raise BadImageError(f"{path}: {n_bytes} bytes, more than the limit of {max_bytes} (Data.max_image_bytes)",
                            "file too large")
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, path, max_pixels, max_bytes)


def decode_image(data, name, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES):
    """The bytes of an image file (read from `name`, or received by a server) -> RGB uint8, with read_image's
    checks; BadImageError names `name`."""
    if len(data) > max_bytes:
        raise BadImageError(f"{name}: {len(data)} bytes, more than the limit of {max_bytes}", "file too large")
    if not data:
        raise BadImageError(f"{name}: empty file", "empty file")
    if _truncated(name, data):
        raise BadImageError(f"{name}: truncated image data", "truncated")
    w, h = header_size(data, name)
    if w * h > max_pixels:
        raise BadImageError(f"{name}: its header declares {w}x{h} = {w * h} pixels, more than the limit of "
                            f"{max_pixels} (Data.max_image_pixels); not decoded", "too many pixels")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise BadImageError(f"{name}: OpenCV could not decode it ({str(e).strip().splitlines()[-1]})",
                            "decoder error") from None
    if img is None:
        raise BadImageError(f"{name}: not an image OpenCV can decode", "undecodable")
    return to_rgb_uint8(img, name)


def to_rgb_uint8(img, name="<array>"):
    """Any OpenCV-decoded array (BGR / BGRA / gray, 8 or 16 bit, float) -> RGB uint8 HxWx3."""
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        raise BadImageError(f"{name}: unsupported pixel type {img.dtype}", "unsupported pixels")
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise BadImageError(f"{name}: unsupported image shape {img.shape}", "unsupported pixels")
    c = img.shape[2]
    if c == 1:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))
    if c == 2:  # gray + alpha
        gray, alpha = img[:, :, :1].astype(np.float32), img[:, :, 1:].astype(np.float32) / 255.0
        out = gray * alpha + 255.0 * (1.0 - alpha)
        return np.repeat((out + 0.5).astype(np.uint8), 3, axis=2)
    if c == 4:  # BGRA: composite onto white
        alpha = img[:, :, 3:].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(img[:, :, ::-1])




def resize_center_crop(img, size):
    """Resize so the short side is `size` (area filter when shrinking, cubic when growing), then center-crop."""
    h, w = img.shape[:2]
    scale = size / min(h, w)
    if scale != 1.0:
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
        img = cv2.resize(img, (nw, nh), interpolation=interp)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def to_tensor_array(img):
    """RGB uint8 HxWx3 -> float32 3xHxW in [-1, 1] (the range the VQ model works in)."""
    return (img.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def to_uint8_image(arr):
    """float 3xHxW in [-1, 1] -> RGB uint8 HxWx3."""
    arr = np.clip((np.asarray(arr, np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    return arr.astype(np.uint8).transpose(1, 2, 0)
