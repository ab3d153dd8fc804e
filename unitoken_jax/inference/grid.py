"""Each row's state machine for images: the grid is enforced while a row draws.

Modes: TEXT, then after <racm3:break> HEIGHT and WIDTH (grid tokens, the sizes a row allows),
BODY (only image codes inside a row, the newline at each row end), END (only <eoss>), then TEXT
again, or DONE. A row that was asked for a size gets exactly H * (W + 1) body tokens and <eoss>.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from unitoken_jax.tokenizer import layout

TEXT, HEIGHT, WIDTH, BODY, END, DONE = range(6)


@struct.dataclass
class GridState:
    """One entry a row ([R] arrays): where the row is in the image layout, and its limits."""

    mode: jax.Array  # TEXT .. DONE
    col: jax.Array  # codes emitted in the current row of the image
    row: jax.Array  # rows of the image completed
    h_codes: jax.Array  # the image's height and width in codes (from its grid tokens)
    w_codes: jax.Array
    forced_h: jax.Array  # grid units the request asks for (0: the model chooses, up to max_grid)
    forced_w: jax.Array
    max_grid: jax.Array
    allow_images: jax.Array  # may a text row start an image?
    stop_after_image: jax.Array
    images_done: jax.Array

    @classmethod
    def start(cls, last_token, forced_hw, max_grid, allow_images, stop_after_image) -> "GridState":
        """Host-side initial state of rows whose prompts end with `last_token` (at <racm3:break>
        a row starts in HEIGHT)."""
        n = len(last_token)
        zeros = np.zeros(n, np.int32)
        forced_hw = np.asarray(forced_hw, np.int32).reshape(n, 2)
        return cls(mode=np.where(np.asarray(last_token) == layout.IMAGE_START, HEIGHT, TEXT).astype(np.int32),
                   col=zeros, row=zeros, h_codes=zeros, w_codes=zeros,
                   forced_h=forced_hw[:, 0], forced_w=forced_hw[:, 1], max_grid=np.asarray(max_grid, np.int32),
                   allow_images=np.asarray(allow_images, bool), stop_after_image=np.asarray(stop_after_image, bool),
                   images_done=zeros)


def allowed(state: GridState, vocab_size: int):
    """Boolean [R, V] of the ids each row may emit now."""
    ids = jnp.arange(vocab_size)[None, :]
    mode = state.mode[:, None]
    lo, hi = layout.CODE_ID_RANGE
    is_code = (ids >= lo) & (ids < hi)

    text_ok = ~layout.is_image_id(ids, jnp)
    text_ok |= (ids == layout.IMAGE_START) & state.allow_images[:, None]

    def grid_ok(forced):
        forced = forced[:, None]
        n = ids - layout.GRID_BASE
        free = (n >= 1) & (n <= state.max_grid[:, None])
        return jnp.where(forced > 0, n == forced, free)

    at_row_end = (state.col == state.w_codes)[:, None]
    body_ok = jnp.where(at_row_end, ids == layout.NEWLINE, is_code)
    out = jnp.where(mode == TEXT, text_ok, False)
    out = jnp.where(mode == HEIGHT, grid_ok(state.forced_h), out)
    out = jnp.where(mode == WIDTH, grid_ok(state.forced_w), out)
    out = jnp.where(mode == BODY, body_ok, out)
    out = jnp.where(mode == END, ids == layout.IMAGE_END, out)
    return out


def advance(state: GridState, token_R, stop_R) -> GridState:
    """The state after each row emitted `token_R`; `stop_R` marks stop tokens for text rows."""
    mode, col, row = state.mode, state.col, state.row
    grid = (token_R - layout.GRID_BASE) * layout.CODES_PER_GRID
    new_mode = mode
    new_mode = jnp.where((mode == TEXT) & (token_R == layout.IMAGE_START), HEIGHT, new_mode)
    new_mode = jnp.where((mode == TEXT) & stop_R, DONE, new_mode)
    new_mode = jnp.where(mode == HEIGHT, WIDTH, new_mode)
    new_mode = jnp.where(mode == WIDTH, BODY, new_mode)
    h_codes = jnp.where(mode == HEIGHT, grid, state.h_codes)
    w_codes = jnp.where(mode == WIDTH, grid, state.w_codes)
    in_body = mode == BODY
    newline = in_body & (col == w_codes)
    new_col = jnp.where(mode == WIDTH, 0, jnp.where(in_body, jnp.where(newline, 0, col + 1), col))
    new_row = jnp.where(mode == WIDTH, 0, jnp.where(newline, row + 1, row))
    new_mode = jnp.where(newline & (new_row == h_codes), END, new_mode)
    after_image = jnp.where(state.stop_after_image, DONE, TEXT)
    new_mode = jnp.where(mode == END, after_image, new_mode)
    new_mode = jnp.where(mode == DONE, DONE, new_mode)
    return state.replace(mode=new_mode, col=new_col, row=new_row, h_codes=h_codes, w_codes=w_codes,
                         images_done=state.images_done + (mode == END))


def in_image(state: GridState):
    return (state.mode >= HEIGHT) & (state.mode <= END)


def forced_token(state: GridState):
    """The one id a row must emit now (a requested grid size, a row-end newline, the end of the
    image), or -1 where the row samples."""
    mode = state.mode
    forced = jnp.full(mode.shape, -1, jnp.int32)
    forced = jnp.where((mode == HEIGHT) & (state.forced_h > 0), layout.GRID_BASE + state.forced_h, forced)
    forced = jnp.where((mode == WIDTH) & (state.forced_w > 0), layout.GRID_BASE + state.forced_w, forced)
    forced = jnp.where((mode == BODY) & (state.col == state.w_codes), layout.NEWLINE, forced)
    return jnp.where(mode == END, layout.IMAGE_END, forced)


CODE_LOGITS = layout.CODE_ID_RANGE[1]  # logits of ids [0, 8196) cover every image code


def codes_only(state: GridState):
    """True when no row needs a logit outside [0, CODE_LOGITS): each row is forced, drawing codes
    or done, so the step can skip 7/8 of the output projection."""
    mode = state.mode
    ok = (mode == BODY) | (mode == END) | (mode == DONE) | (forced_token(state) >= 0)
    return jnp.all(ok)
