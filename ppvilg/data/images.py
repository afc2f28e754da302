"""Images in the training package: safe reading and preprocessing come from the deployment runtime
(ppvilg_deploy.images: `read_image` checks size and header pixels before decoding, `BadImageError`, resize +
center-crop), plus grids and PNG writing."""
import cv2
import numpy as np
from ppvilg_deploy.images import (MAX_BYTES, MAX_PIXELS, BadImageError, header_size, read_image,  # noqa: F401
                                  resize_center_crop, to_rgb_uint8, to_tensor_array, to_uint8_image)


def make_grid(images, ncol):
    """A list of RGB uint8 HxWx3 images (same size) -> one grid image, with 2-pixel white gaps."""
    h, w = images[0].shape[:2]
    nrow = (len(images) + ncol - 1) // ncol
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = im
    return grid


def write_png(path, rgb):
    from ppvilg.utils.io import atomic_write_bytes
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, buf.tobytes())
