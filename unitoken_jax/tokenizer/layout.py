"""The token layout of one image, as the released checkpoints were trained on (DESIGN.md §1):

    <racm3:break> H W { rows x (W' codes, <reserved08799>) } [SEP] { continuous x N } <eoss>

H and W are grid tokens <reserved{8800+n}> (id 8804+n) with n = side / 32 px; a side of n grid
units holds 2n VQ codes (16 px each). Every row ends with the newline token, the last one too.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_START = 8197  # <racm3:break>
IMAGE_END = 8196  # <eoss>
SEP = 8198  # <sentinel:0>, between the codes and the continuous features
NEWLINE = 8803  # <reserved08799>, ends every row of codes (and every AnyRes feature row)
GRID_BASE = 8804  # <reserved{8800+n}> = 8804 + n
END_OF_TURN = 8710  # <reserved08706>, ends every message; the stop token
CODE_ID_RANGE = (4, 8196)  # image codes live at BPE ids 4..8195
PIXELS_PER_GRID = 32
CODES_PER_GRID = 2
MAX_GRID = 95  # grid ids stay below 8900

# Every id that belongs to an image, not to text: the codes, <eoss>, <racm3:break>, SEP, the row
# newline and the grid-size tokens. The loss splits understanding / generation by it; a text row
# of the decode loop may emit none of them (but <racm3:break>, where images are allowed).
IMAGE_ID_RANGES = ((CODE_ID_RANGE[0], SEP + 1), (NEWLINE, GRID_BASE + MAX_GRID + 1))

CONTROL_TOKENS = {
    "<racm3:break>": IMAGE_START, "<eoss>": IMAGE_END, "<reserved08799>": NEWLINE,
    "<reserved08706>": END_OF_TURN, "<reserved08816>": GRID_BASE + 16,
}


class MalformedImageTokens(ValueError):
    """A generated image token stream that does not follow the layout; the message says how."""


def grid_token(n: int) -> int:
    if not 1 <= n <= MAX_GRID:
        raise ValueError(f"grid size {n} is outside 1..{MAX_GRID}")
    return GRID_BASE + n


def is_image_id(ids, xp=np):
    """Elementwise: does each id belong to an image (`IMAGE_ID_RANGES`)? `xp` is numpy or jax.numpy."""
    hit = xp.zeros(xp.shape(ids), bool)
    for lo, hi in IMAGE_ID_RANGES:
        hit = hit | ((ids >= lo) & (ids < hi))
    return hit


def image_body_length(grid_hw: tuple[int, int]) -> int:
    """Ids between the grid tokens and <eoss> of a discrete image of `grid_hw` grid units: rows
    of codes, each ending with the newline."""
    h, w = grid_hw
    return h * CODES_PER_GRID * (w * CODES_PER_GRID + 1)


def generated_image_length(grid_hw: tuple[int, int]) -> int:
    """What the decoder emits for one picture: <racm3:break> H W body <eoss>."""
    return 3 + image_body_length(grid_hw) + 1


def discrete_image_ids(code_ids_hw: np.ndarray) -> list[int]:
    """<racm3:break> H W rows-with-newlines (no SEP, no <eoss>) for a grid of code *BPE ids*."""
    h, w = code_ids_hw.shape
    if h % CODES_PER_GRID or w % CODES_PER_GRID:
        raise ValueError(f"a code grid of {h}x{w} is not a whole number of 32-px grid units")
    rows = np.concatenate([code_ids_hw, np.full((h, 1), NEWLINE, code_ids_hw.dtype)], axis=1)
    return [IMAGE_START, grid_token(h // CODES_PER_GRID), grid_token(w // CODES_PER_GRID)] + rows.reshape(-1).tolist()


@dataclasses.dataclass
class ParsedImage:
    code_ids: np.ndarray  # [h, w] BPE ids of the codes
    repairs: list[str]  # what repair mode changed (empty when the stream was well formed)


def parse_image_ids(ids, *, repair: bool = False, filler_id: int | None = None) -> ParsedImage:
    """Reads `<racm3:break> H W rows... [<eoss>]` back into a code grid.

    Without `repair` any deviation is a `MalformedImageTokens`. With it, rows are cut or padded
    to the declared width with a filler (the last code seen; where none was, `filler_id`, by
    default the lowest code id: give the id of a code the VQ-GAN has), stray ids inside a row are
    replaced by the filler, missing rows are filled and a missing <eoss> is accepted; every change
    is listed in `repairs`.
    """
    ids = [int(i) for i in ids]
    repairs: list[str] = []
    if len(ids) < 3 or ids[0] != IMAGE_START:
        raise MalformedImageTokens("the image does not start with <racm3:break> and two grid tokens")
    h_grid, w_grid = ids[1] - GRID_BASE, ids[2] - GRID_BASE
    if not (1 <= h_grid <= MAX_GRID and 1 <= w_grid <= MAX_GRID):
        raise MalformedImageTokens(f"grid tokens {ids[1]}, {ids[2]} are not sizes (ids {GRID_BASE + 1}.."
                                   f"{GRID_BASE + MAX_GRID})")
    h, w = h_grid * CODES_PER_GRID, w_grid * CODES_PER_GRID
    body = ids[3:]
    # a training-layout stream: SEP after the declared rows, then the continuous block up to <eoss>
    # (dropped); a SEP inside the rows is a stray id like any other
    seps = [k for k, i in enumerate(body) if i == SEP and body[:k].count(NEWLINE) >= h]
    if seps:
        end = body.index(IMAGE_END, seps[0]) if IMAGE_END in body[seps[0]:] else len(body)
        body = body[:seps[0]] + body[end:]
    if IMAGE_END in body:
        extra = len(body) - body.index(IMAGE_END) - 1
        if extra:
            if not repair:
                raise MalformedImageTokens(f"{extra} id(s) follow <eoss>")
            repairs.append(f"dropped {extra} id(s) after <eoss>")
        body = body[:body.index(IMAGE_END)]
    elif not repair:
        raise MalformedImageTokens("the image has no <eoss> end token")
    else:
        repairs.append("no <eoss>: accepted")
    lo, hi = CODE_ID_RANGE
    rows, row = [], []
    for i in body:
        if i == NEWLINE:
            rows.append(row)
            row = []
        else:
            row.append(i)
    if row:
        if not repair:
            raise MalformedImageTokens(f"the last row ({len(row)} ids) has no newline")
        rows.append(row)
        repairs.append("last row had no newline")
    if not repair:
        if len(rows) != h:
            raise MalformedImageTokens(f"{len(rows)} rows, the grid tokens say {h}")
        for r, row in enumerate(rows):
            if len(row) != w:
                raise MalformedImageTokens(f"row {r} has {len(row)} ids, the grid tokens say {w}")
            stray = [i for i in row if not lo <= i < hi]
            if stray:
                raise MalformedImageTokens(f"row {r} holds non-code ids {stray[:5]}")
        return ParsedImage(np.array(rows, np.int32).reshape(h, w), repairs)

    seen = [i for row in rows for i in row if lo <= i < hi]
    filler = seen[-1] if seen else (filler_id if filler_id is not None else lo)
    fixed = []
    for r, row in enumerate(rows[:h]):
        stray = sum(1 for i in row if not lo <= i < hi)
        if stray:
            repairs.append(f"row {r}: replaced {stray} non-code id(s)")
        row = [i if lo <= i < hi else filler for i in row]
        if len(row) != w:
            repairs.append(f"row {r}: {len(row)} ids, {'cut' if len(row) > w else 'padded'} to {w}")
            row = (row + [filler] * w)[:w]
        fixed.append(row)
    if len(rows) != h:
        repairs.append(f"{len(rows)} rows, {'cut' if len(rows) > h else 'padded'} to {h}")
        fixed += [[filler] * w] * (h - len(fixed))
    return ParsedImage(np.array(fixed, np.int32).reshape(h, w), repairs)

# the token the reference puts before <racm3:break> when it asks a released model for a picture
# (`inference.pipeline` adds it where the vocabulary has it)
REFERENCE_IMAGE_PREFIX = (16853,)
