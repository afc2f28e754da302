"""Image preprocessing shared by training and deployment: resize + center-crop (the paper's), the [-1, 1]
range of the VQ tokenizer, and back to RGB uint8."""
import cv2
import numpy as np


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
