"""Reading images safely: any mode to RGB, clear errors, huge images bounded.

Orientation, two conventions:

- a user's own picture (CLI, demo, batch files) is the picture as viewers show it: the
  EXIF orientation tag is applied, and the user's box is in that picture's pixels, which
  are also the pixels the model sees (``exif_transpose=True``, the default);
- dataset images (Visual Genome, TextOCR, LAION, region instructions, benchmark
  annotations) are read as stored, ignoring the tag, as upstream did: their boxes were
  drawn on the stored pixels (``exif_transpose=False``).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from click4caption.errors import InputError

logger = logging.getLogger(__name__)

# Pillow refuses images over ~89 Mpx as a decompression-bomb guard; we accept up to
# this many pixels and refuse larger ones with a clear message.
MAX_IMAGE_PIXELS = 250_000_000


def to_rgb(image: Image.Image, exif_transpose: bool = True) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white; 16-bit and float
    grayscale are rescaled to 0..255; the EXIF orientation is applied when
    ``exif_transpose`` (see the module docstring)."""
    if exif_transpose:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # broken EXIF must not stop us
            pass
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if image.mode.startswith("I;16") and hi <= 65535:
            arr = arr / 257.0 if hi > 255 else arr
        elif hi > lo:
            arr = (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | Path, exif_transpose: bool = True) -> Image.Image:
    """Open ``path`` as 8-bit RGB, turned by its EXIF orientation tag when
    ``exif_transpose`` (a user's picture) or as stored (dataset images).

    Raises:
        InputError: missing file, not an image, corrupt, or over ``MAX_IMAGE_PIXELS``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"image path is a folder: {path}")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # the size is checked below, with a one-line error instead of PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"image too large: {path} is {img.width}x{img.height} pixels "
                                     f"(limit {MAX_IMAGE_PIXELS:,})")
                img.load()
                return to_rgb(img, exif_transpose)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"image too large: {path} (limit {MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise InputError(f"not an image (or an unsupported format): {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {str(err).splitlines()[0] if str(err) else 'corrupt file'}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
