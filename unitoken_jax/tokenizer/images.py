"""Opening user images safely and turning them into the pixel arrays the model takes.

`load_image` gives the first frame in one of the modes RGB, RGBA, L or LA: palette images become
RGB(A), CMYK becomes RGB, and 16- and 32-bit greyscale is rescaled to 8 bits instead of being
clipped. Each path then makes RGB its own way, as the reference does: the SigLIP side drops
transparency (the reference's `Image.convert("RGB")` before its SigLIP processor: the colour under
a transparent pixel is what the released ViT saw), the VQ side crops first and then blends on white
with the reference's formula. Anything unreadable raises `ImageError`, which says
what was wrong with which file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFont, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]

# Larger images are refused from their header, before any pixel is decoded (a decompression bomb
# is a small file that claims a huge size). 8192 x 8192 is far beyond what either encoder uses.
MAX_PIXELS = 8192 * 8192
# The VQ crop scales a picture to cover its square, then crops. Past this many times the square's
# area (a long strip), it crops the part that survives first and scales only that.
MAX_COVER_AREA = 16


class ImageError(ValueError):
    """An image that cannot be used: unreadable, truncated, not an image, or too large."""


log = logging.getLogger(__name__)
_SAID_FRAMES = []  # (an animation's first frame alone is read: said once a process, not per file)


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))} {source.dtype}>"
    if isinstance(source, Image.Image):  # (a PIL image opened from a file keeps its path here)
        return getattr(source, "filename", None) or f"<PIL image {source.width}x{source.height}>"
    return getattr(source, "name", None) or type(source).__name__


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS, what: str | None = None) -> Image.Image:
    """Opens `source` (a path, bytes, a file object, a PIL image, or a uint8 array [H, W] or
    [H, W, 1 | 3 | 4] as numpy and PIL hold pictures) as an RGB PIL image. A picture of more than
    `max_pixels` is refused from its header. `what` names the picture in errors (default: its path,
    else its size in bytes)."""
    what = what or _describe(source)
    if isinstance(source, Image.Image):
        try:  # (one the caller opened lazily is read now: a cut file's OSError said as ours)
            source.load()
        except ValueError as e:  # (PIL's word for any use of an image after its close(); not the file's fault)
            if "closed image" in str(e):
                raise ImageError(f"{what}: the PIL image was closed before it was read (load() it, or keep it "
                                 "open, until the call returns)") from e
            raise ImageError(f"{what}: cannot decode ({e}); the file is probably truncated or corrupt") from e
        except (OSError, SyntaxError) as e:
            raise ImageError(f"{what}: cannot decode ({e}); the file is probably truncated or corrupt") from e
        image = _upright(source)  # (as a file's: transformers' load_image turns PIL images too)
    elif isinstance(source, np.ndarray):
        image = _from_array(source, what)
    elif not isinstance(source, (str, os.PathLike, bytes)) and not hasattr(source, "read"):
        raise ImageError(f"{what}: a picture is a path, bytes, a file object, a PIL image or a uint8 array; "
                         f"got {type(source).__name__}")
    else:
        if isinstance(source, (str, os.PathLike)):
            if not os.path.exists(source):
                raise ImageError(f"{what}: no such file")
            if os.path.isdir(source):
                raise ImageError(f"{what}: is a directory, not an image file")
            if os.path.getsize(source) == 0:
                raise ImageError(f"{what}: the file is empty (0 bytes)")
        if isinstance(source, io.TextIOBase):  # (its read() decodes the picture's bytes as text)
            raise ImageError(f"{what}: a file opened in text mode; open pictures in binary mode, open(path, 'rb')")
        if isinstance(source, bytes):
            if not source:
                raise ImageError("the image data is empty (0 bytes)")
            source = io.BytesIO(source)
        try:
            with warnings.catch_warnings():  # (its size is checked below, against our own limit)
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(source)  # reads the header only
        except UnidentifiedImageError as e:
            raise ImageError(f"{what}: not an image file PIL can read") from e
        except Image.DecompressionBombError as e:  # (PIL's own, past twice its limit: said against ours)
            claimed = re.search(r"\((\d+) pixels\)", str(e))
            pixels = claimed.group(1) if claimed else f"more than {2 * Image.MAX_IMAGE_PIXELS}"
            raise ImageError(f"{what}: refused, {pixels} pixels is more than the limit of {max_pixels} "
                             "(a decompression bomb, or a picture to scale down first)") from e
        except (OSError, SyntaxError, ValueError) as e:  # (some readers decode as they open: a WebP, a JPEG's header)
            raise ImageError(f"{what}: cannot decode ({e}); the file is probably truncated or corrupt") from e
        width, height = image.size
        if width * height > max_pixels:
            image.close()
            raise ImageError(f"{what}: refused, {width}x{height} = {width * height} pixels is more than the "
                             f"limit of {max_pixels}: scale it down first (the encoders see a few hundred pixels "
                             "a side)")
        frames = getattr(image, "n_frames", 1)
        # (a phone's JPEG holding more pictures, e.g. a depth map or a gain map, is an MPO: its first is the photo)
        if frames > 1 and image.format != "MPO" and not _SAID_FRAMES:
            _SAID_FRAMES.append(what)
            log.warning("%s is an animation of %d frames: only its first frame is read (said for the first "
                        "animation only)", what, frames)
        try:
            image.seek(0)  # first frame of an animation
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            image.close()
            raise ImageError(f"{what}: cannot decode ({e}); the file is probably truncated or corrupt") from e
        opened, image = image, _upright(image)
        if frames > 1:  # (PIL keeps an animation's file open for its other frames: this frame alone, the file closed)
            image = image.copy() if image is opened else image
            opened.close()
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{what}: the image has no pixels ({image.width}x{image.height})")
    return _standard_mode(image)


def _upright(image: Image.Image) -> Image.Image:
    """A file's picture turned as its EXIF orientation says it is shown (a phone's photos are
    stored sideways with a tag), as transformers' `load_image` does; the reference read them as
    stored. A tag PIL cannot apply leaves the picture as it is."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return image


def _from_array(array: np.ndarray, what: str) -> Image.Image:
    """A uint8 picture array, [H, W] or [H, W, C] with C of 1, 3 or 4, as a PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageError(f"{what}: an array picture is [H, W] or [H, W, 1 | 3 | 4], got shape {array.shape}")
    if array.dtype != np.uint8:  # a float array's range (0..1? -1..1? 0..255?) cannot be told from it
        raise ImageError(f"{what}: an array picture holds uint8 values 0..255, got {array.dtype} (scale and "
                         "convert it first, e.g. (x * 255).round().astype(np.uint8) for values in 0..1)")
    return Image.fromarray(np.ascontiguousarray(array))


def _standard_mode(image: Image.Image) -> Image.Image:
    """RGB, RGBA, L or LA, keeping transparency; high-bit-depth greyscale rescaled to 8 bits."""
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = max(float(values.max()), 1.0)
        elif image.mode == "I" and values.max() <= 255:  # 8-bit values as 32-bit ints (convert("I"), an int
            top = 255.0  # array): as PIL's own convert("L") reads them (rescaled as 16-bit, they were black)
        else:  # 16-bit files open as "I;16" (older PILs: "I"); both hold 0..65535
            top = 65535.0 if values.max() <= 65535 else float(values.max())
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha (PIL converts these to their plain forms only)
        image = image.convert("LA" if image.mode == "La" else "RGBA")
        return image
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    return image.convert("RGBA" if has_alpha else "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The SigLIP side's RGB, as the reference makes it: `Image.convert("RGB")`, which drops
    transparency (its training and demo code convert every picture so before the SigLIP processor,
    whose own `convert_to_rgb`, compositing on white, then never sees an alpha channel)."""
    image = _standard_mode(image)
    return image if image.mode == "RGB" else image.convert("RGB")


# --- the SigLIP side ------------------------------------------------------------------------------

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def siglip_pixels(image: Image.Image, size: int = 384) -> np.ndarray:
    """As transformers' SigLIP image processor for so400m-patch14-384: bicubic resize to
    size x size, scale to [0, 1], normalise with mean = std = 0.5. Returns float32 [H, W, 3]."""
    resized = to_rgb(image).resize((size, size), Image.BICUBIC)
    return normalize(np.asarray(resized))


def normalize(pixels_uint8: np.ndarray) -> np.ndarray:
    x = pixels_uint8.astype(np.float32) / 255.0
    return ((x - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


# --- the VQ side ------------------------------------------------------------------------------------

def vq_crop(image: Image.Image, size: int = 512, *, seed: int | None = None) -> Image.Image:
    """The reference's crop to size x size: halve with a box filter while both sides are at least
    twice the target, scale bicubically so the picture covers the square (sides rounded), then
    crop. The reference picks the crop offset with the global `random`; here it is the centre
    unless a `seed` asks for a reproducible random offset (augmentation). A strip longer than 16:1
    after the halving is not scaled whole (memory): only the box that becomes the crop is, which
    puts some pixels up to 2 levels of 255 from the reference's (measured at 100 x 1800)."""
    image = _standard_mode(image)
    while image.width >= 2 * size and image.height >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(size / image.width, size / image.height)
    cover = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    if seed is None:
        left, top = (cover[0] - size) // 2, (cover[1] - size) // 2
    else:
        rng = np.random.default_rng(seed)
        left = int(rng.integers(0, cover[0] - size + 1))
        top = int(rng.integers(0, cover[1] - size + 1))
    if cover[0] * cover[1] > MAX_COVER_AREA * size * size:
        # a long strip: scale only the source box that becomes the crop (the covering picture of a
        # 60000 x 1 strip would be 30 M x 512 pixels)
        sx, sy = image.width / cover[0], image.height / cover[1]
        return image.resize((size, size), resample=Image.BICUBIC,
                            box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    image = image.resize(cover, resample=Image.BICUBIC)
    return image.crop((left, top, left + size, top + size))


def whiten(image: Image.Image) -> Image.Image:
    """The reference VQ tokenizer's RGB conversion: alpha blended on white as (1 - a) * 255 + a * rgb,
    truncated to uint8 (PIL's alpha_composite rounds instead)."""
    image = _standard_mode(image)
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if (rgba[..., 3] == 255).all():
        return image.convert("RGB")
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    rgb = (1.0 - alpha) * 255.0 + alpha * rgba[..., :3]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def vq_pixels(image: Image.Image) -> np.ndarray:
    """-> float32 [H, W, 3] in [-1, 1], as the reference's image tokenizer (x / 255 * 2 - 1)."""
    return (np.asarray(whiten(image), np.float64) / 255.0 * 2.0 - 1.0).astype(np.float32)


def pil_from_pixels(pixels_HWC: np.ndarray) -> Image.Image:
    """Decoder output in about [-1, 1] -> RGB picture: clip, (x + 1) / 2 * 255, truncate (as the reference)."""
    x = (np.clip(np.asarray(pixels_HWC, np.float32), -1.0, 1.0) + 1.0) / 2.0
    return Image.fromarray((x * 255.0).astype(np.uint8), "RGB")


def label_font(size: int = 12):
    """DejaVu Sans where the system has it (accents: Pillow's own font draws 'à' as a box), else
    Pillow's default."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)
