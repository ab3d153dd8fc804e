"""AnyRes for the SigLIP side (the reference's LLaVA-NeXT-style tiling).

An image is resized and padded to the best of the grid pinpoints, cut into 384-px tiles, and
encoded together with a 384 x 384 resize of the whole picture (the base image, first). The
features of the tiles are laid out as one 2-D grid, the rows and columns that only cover padding
are removed ("unpad"), and each remaining row ends with the embedding of the newline token 8803.
The continuous block of the image is then: 729 base features, then rows x (kept columns + 1).

Sizes are (width, height) throughout, as in the reference's `mm_utils`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from unitoken_jax.tokenizer.images import siglip_pixels, to_rgb

GRID_PINPOINTS = ((384, 768), (768, 384), (768, 768), (384, 1152), (1152, 384))
NEWLINE_ENTRY = -1  # in `AnyResImage.entries`: the newline token, not a feature


def default_pinpoints(tile: int = 384) -> tuple[tuple[int, int], ...]:
    """The reference's pinpoints (for 384-px tiles) scaled to `tile`-px tiles: 1x2, 2x1, 2x2, 1x3
    and 3x1 tiles whatever the tile size."""
    return tuple((a * tile // 384, b * tile // 384) for a, b in GRID_PINPOINTS)


def select_best_resolution(size_wh: tuple[int, int], pinpoints=GRID_PINPOINTS) -> tuple[int, int]:
    """The pinpoint that keeps the most of the picture, then wastes the least (first wins ties)."""
    w, h = size_wh
    best, best_effective, best_wasted = None, 0, float("inf")
    for pw, ph in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pw, ph), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target_wh: tuple[int, int]) -> Image.Image:
    """Fit inside the target keeping the aspect ratio (sides rounded up), centred on black."""
    w, h = image.size
    tw, th = target_wh
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(h * scale_w), th)
    else:
        nw, nh = min(math.ceil(w * scale_h), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def unpad_slices(grid_hw: tuple[int, int], original_wh: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of the tile-feature grid that show the picture rather than padding."""
    rows, cols = grid_hw
    w, h = original_wh
    if w / h > cols / rows:
        new_rows = int(h * (cols / w))
        pad = (rows - new_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_cols = int(w * (rows / h))
    pad = (cols - new_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


@dataclasses.dataclass
class AnyResImage:
    pixels: np.ndarray  # [1 + tiles, 384, 384, 3], base image first
    grid_wh: tuple[int, int]  # tiles across, tiles down
    entries: np.ndarray  # the continuous block: feature index into pixels' features, or NEWLINE_ENTRY

    @property
    def num_positions(self) -> int:
        return len(self.entries)


def check_pinpoints(pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """`pinpoints` as (width, height) pairs of whole pixels (None or empty: `default_pinpoints(tile)`,
    as everywhere that takes them), or a ValueError naming the first that is not a pair of positive
    whole numbers, or those that are not whole tiles (tiles cut past a canvas's edge would not be
    the tiles `anyres_entries` counts)."""
    if pinpoints is None or len(pinpoints) == 0:
        return default_pinpoints(tile)

    def whole(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

    for p in pinpoints:
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(whole(v) for v in p)):
            raise ValueError(f"AnyRes pinpoint {p!r}: give (width, height) pairs of whole pixels, e.g. "
                             f"(({tile}, {2 * tile}), ({2 * tile}, {tile}))")
    bad = [tuple(p) for p in pinpoints if p[0] % tile or p[1] % tile]
    if bad:
        raise ValueError(f"AnyRes pinpoints {bad} are not whole multiples of the {tile}-px tile")
    return tuple((int(w), int(h)) for w, h in pinpoints)


def anyres_image(image: Image.Image, tile: int = 384, patch: int = 14, pinpoints=None) -> AnyResImage:
    """`pinpoints`: (width, height) canvases, multiples of `tile`; None or empty: `default_pinpoints(tile)`."""
    pinpoints = check_pinpoints(pinpoints, tile)
    image = to_rgb(image)
    best = select_best_resolution(image.size, pinpoints)
    padded = resize_and_pad(image, best)
    tiles = [padded.crop((x, y, x + tile, y + tile))
             for y in range(0, best[1], tile) for x in range(0, best[0], tile)]
    base = image.resize((tile, tile), Image.BICUBIC)
    pixels = np.stack([siglip_pixels(t, tile) for t in [base] + tiles])
    return AnyResImage(pixels, (best[0] // tile, best[1] // tile),
                       anyres_entries((best[0] // tile, best[1] // tile), image.size, tile // patch))


def anyres_entries(grid_wh: tuple[int, int], original_wh: tuple[int, int], side: int = 27) -> np.ndarray:
    """Feature indices of one image's continuous block (image-local: tile t's feature j is t*side^2 + j,
    tile 0 the base image), with NEWLINE_ENTRY at the end of every kept row."""
    across, down = grid_wh
    per_tile = side * side
    rows, cols = np.meshgrid(np.arange(down * side), np.arange(across * side), indexing="ij")
    tile = 1 + (rows // side) * across + (cols // side)
    index = tile * per_tile + (rows % side) * side + (cols % side)
    r, c = unpad_slices(index.shape, original_wh)
    kept = index[r, c]
    with_newlines = np.concatenate([kept, np.full((kept.shape[0], 1), NEWLINE_ENTRY)], axis=1)
    return np.concatenate([np.arange(per_tile), with_newlines.reshape(-1)]).astype(np.int64)


def max_block(tile: int = 384, patch: int = 14, pinpoints=None) -> int:
    """The most positions one AnyRes picture's SigLIP part takes (<sentinel:0>, the base image's
    features, then the largest pinpoint's grid with nothing unpadded, a newline a row): 3,700 for
    the released model. The reference caps the discrete tokens of a sample at the model's 4,096
    positions and puts this block on top, so an AnyRes sample is up to 4,096 + 3,700 long."""
    side = tile // patch
    grids = [(pw // tile, ph // tile) for pw, ph in check_pinpoints(pinpoints, tile)]
    return 1 + side * side + max((down * side) * (across * side + 1) for across, down in grids)


def base_entries(side: int = 27) -> np.ndarray:
    """The base (non-AnyRes) model: the 729 features of one 384 x 384 image, no newline."""
    return np.arange(side * side, dtype=np.int64)
