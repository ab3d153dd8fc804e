"""Batched decoding on the device: prefill, then a compiled loop that samples every row with its
own parameters, grid state machine and random key.

Classifier-free guidance puts each guided row's unconditional partner in the same batch: one
weight read per step serves both. The partner is fed the tokens its row samples; its logits only
ever enter through the guidance formula. Logits enter guidance and sampling as float32 whatever
the model computes in, as transformers' `generate` (the reference's decoding) hands them to its
logits processors.

The loop runs `chunk` steps at a time inside one `lax.while_loop` and returns to Python only
between chunks (to report progress), never per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from unitoken_jax import sharding
from unitoken_jax.inference import grid, sampling
from unitoken_jax.inference.grid import GridState
from unitoken_jax.models.chameleon import Cache, cache_length
from unitoken_jax.models.layers import attention_dtype
from unitoken_jax.models.unitoken import UniToken, cpu_decode_config, cpu_decode_params
from unitoken_jax.tokenizer import layout
from unitoken_jax.tokenizer.conversation import SequenceTooLong

PROMPT_MULTIPLE = 32  # the prefill's width is a multiple of this by default (`DecodeLoop(prompt_multiple=...)`)
# A scanned loop's attention on a CPU reads the stacked cache this many slots at a time, the filled
# blocks only (`DecodeLoop(cache_block=...)`): the benchmark model's 16-row step took 53 ms instead
# of 110 (benchmarks/results/decode_blocks.md). On an H200 it was slower than reading every slot
# (the 7B, int8, 8 images with CFG: 0.373 against 0.520 images/s, benchmarks/results/decode_accel.md),
# so accelerators read every slot.
CPU_CACHE_BLOCK = 128
MIN_CAPACITY = 256  # doubling from here gives the number of sizes an unrolled loop's cache takes (`default_growth`)
GROWTH_ROUND = 16  # an unrolled loop's default growth step is a multiple of this


def _chunk_ends(max_new: int, chunk: int) -> list[int]:
    """The steps after which a `max_new`-step decoding returns to the host, `chunk` at a time."""
    return [min(e, max_new) for e in range(chunk, max_new + chunk, chunk)] or [0]


def default_growth(first_need: int, full: int) -> int:
    """The slots an unrolled loop's cache grows by, when no `cache_growth` is given, for a cache
    whose first chunk needs `first_need` slots and whose decoding ends at `full`: as many sizes as
    doubling from `MIN_CAPACITY` takes to reach `full` (so no more compiles than doubling), spaced
    evenly instead (the multiples of this step, then `full`). Over a 512 x 512 picture doubling
    reads 39 % more slots than the rows have filled (the last doubling, to 1,024, spans half of
    it), evenly spaced sizes 28 % (272, 544, 816, 1,082): 6-8 % more pictures a second at 16 rows
    in benchmarks/decode.py, at the same compile time (benchmarks/results/decode.md)."""
    size, sizes = min(full, max(MIN_CAPACITY, 1 << (first_need - 1).bit_length())), 1
    while size < full:
        size, sizes = min(full, 2 * size), sizes + 1
    return -(-full // (sizes * GROWTH_ROUND)) * GROWTH_ROUND


class OptionError(ValueError):
    """A request option refused: `option` is its name, the message that name and `rest`. Callers
    that take the option under another name say it by theirs (`renamed`)."""

    def __init__(self, option: str, rest: str):
        super().__init__(option + rest)
        self.option, self.rest = option, rest

    def renamed(self, name: str) -> "OptionError":
        return OptionError(name, self.rest)


def whole_number(value) -> int | None:
    """A whole number (a Python or NumPy integer, or a finite whole float such as 2.0; never a
    bool) as Python's int, else None: the rule every count and seed is read by."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


@dataclasses.dataclass
class Request:
    """One prompt to continue. `feature_index` points into this request's own `pixels`' features."""

    tokens: np.ndarray
    is_continuous: np.ndarray | None = None
    feature_index: np.ndarray | None = None
    pixels: np.ndarray | None = None  # [n, S, S, 3] SigLIP-preprocessed
    max_new_tokens: int = 256  # a row also stops at the model's last position (max_position_embeddings)
    seed: int = 0
    temperature: float = 0.0  # text tokens; 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    image_temperature: float = 1.0
    image_top_k: int = 2000
    image_top_p: float = 1.0
    cfg_scale: float = 1.0  # 1 = no guidance
    uncond_tokens: np.ndarray | None = None  # the unconditional context; default: from <racm3:break> on
    grid_hw: tuple[int, int] | None = None  # grid units (32 px each) an image must have; None = free
    max_grid: int = 32
    allow_images: bool = False  # may a text row start an image?
    stop_after_image: bool = False
    stop_tokens: tuple[int, ...] = (layout.END_OF_TURN,)

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, np.int32)
        if self.tokens.ndim != 1 or not len(self.tokens):
            raise ValueError("a request needs a non-empty 1-D prompt")
        self._check_ranges()
        if self.cfg_scale != 1.0 and self.uncond_tokens is None:
            self.uncond_tokens = np.array([layout.IMAGE_START], np.int32)

    @property
    def starts_in_picture(self) -> bool:
        """Whether the prompt ends with <racm3:break>, so that the answer is a picture's rest (an
        image request's, or an edit's): its ids read back with that token put before them."""
        return len(self.tokens) > 0 and int(self.tokens[-1]) == layout.IMAGE_START

    @property
    def longest_prompt(self) -> int:
        """The positions its rows start from: the prompt's, or its unconditional partner's where
        that is longer (the partner writes a position for each of the row's new tokens)."""
        guided = self.cfg_scale != 1.0 and self.uncond_tokens is not None
        return max(len(self.tokens), len(self.uncond_tokens) if guided else 0)

    def _check_ranges(self) -> None:
        """Every sampling option in its range, or a ValueError naming it: a value outside is refused,
        never quietly read as another setting (a negative temperature as greedy, a negative top-k as
        none)."""
        def number(name, low, high=math.inf, *, integer=False, low_open=False):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value) or (integer and whole_number(value) is None):
                raise OptionError(name, f" must be a finite {'integer' if integer else 'number'}, got {value!r}")
            if value < low or (low_open and value == low) or value > high:
                show = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")  # 4294967295, not 4.29497e+09
                bounds = (f"{'(' if low_open else '['}{show(low)}, {show(high)}]" if high != math.inf
                          else f"{'greater than' if low_open else 'at least'} {show(low)}")
                raise OptionError(name, f"={value!r} is out of range: it must be {bounds}")

        number("max_new_tokens", 1, integer=True)
        number("seed", 0, 2 ** 32 - 1, integer=True)
        for prefix in ("", "image_"):
            number(prefix + "temperature", 0)
            number(prefix + "top_k", 0, 2 ** 31 - 1, integer=True)
            number(prefix + "top_p", 0, 1, low_open=True)
        number("cfg_scale", 0)
        number("max_grid", 1, layout.MAX_GRID, integer=True)  # (a larger size has no grid token)
        if self.grid_hw is not None:
            if len(self.grid_hw) != 2 or not all(isinstance(g, (int, np.integer)) and 1 <= g <= self.max_grid
                                                 for g in self.grid_hw):
                raise OptionError("grid_hw", f"={self.grid_hw!r} must be two whole numbers of grid units in "
                                             f"[1, {self.max_grid}] ({layout.PIXELS_PER_GRID} px each)")
            self.grid_hw = tuple(int(g) for g in self.grid_hw)
        # as Python numbers: a NumPy integer or a whole float passed the checks and then failed in the
        # host-side arithmetic of the decode loop (`int.bit_length`, `range`)
        for name in ("max_new_tokens", "seed", "top_k", "image_top_k", "max_grid"):
            setattr(self, name, int(getattr(self, name)))


def _rows(requests: Sequence[Request]):
    """Guided requests get a second row for their unconditional context, after all cond rows."""
    rows, primary = [], []
    for i, r in enumerate(requests):
        rows.append((r, r.tokens, r.is_continuous, r.feature_index, r.pixels))
        primary.append(i)
    uncond_row = [-1] * len(requests)
    for i, r in enumerate(requests):
        if r.cfg_scale != 1.0:
            uncond_row[i] = len(rows)
            rows.append((r, np.asarray(r.uncond_tokens, np.int32), None, None, None))
            primary.append(i)
    uncond_row += [-1] * (len(rows) - len(requests))
    return rows, np.array(primary, np.int32), np.array(uncond_row, np.int32)


def prefill_width(longest_prompt: int, multiple: int) -> int:
    """The prefill's width for a batch whose longest prompt is `longest_prompt` tokens."""
    return -(-longest_prompt // multiple) * multiple


def _build_batch(rows, tokens_per_image: Callable[[tuple[int, int]], int], multiple: int = 1):
    """The prefill's [rows, length] arrays, each row's prompt from the left and padding (segment
    0, which no position attends to) to `length`: the longest prompt rounded up to `multiple`."""
    n = len(rows)
    length = prefill_width(max(len(t) for _, t, *_ in rows), multiple)
    tokens = np.zeros((n, length), np.int32)
    segments = np.zeros((n, length), np.int32)
    cont = np.zeros((n, length), bool)
    index = np.zeros((n, length), np.int32)
    pixels, offset = [], 0
    for b, (_, toks, c, fi, px) in enumerate(rows):
        tokens[b, :len(toks)], segments[b, :len(toks)] = toks, 1
        if px is not None and len(px):
            cont[b, :len(toks)] = c
            index[b, :len(toks)] = np.where(c, np.asarray(fi) + offset, 0)
            pixels.append(px)
            offset += len(px) * tokens_per_image(px.shape[1:3])
    prompt_len = segments.sum(1).astype(np.int32)
    return tokens, segments, cont, index, (np.concatenate(pixels) if pixels else None), prompt_len


@struct.dataclass
class RowParams:
    """What each row ([R] arrays) samples with; fixed for a whole generation."""

    temperature: jax.Array  # text tokens; 0 = greedy
    top_k: jax.Array
    top_p: jax.Array
    image_temperature: jax.Array
    image_top_k: jax.Array
    image_top_p: jax.Array
    cfg_scale: jax.Array
    max_new: jax.Array
    stop_tokens: jax.Array  # [R, S], padded with -1
    key: jax.Array  # the row's random key (its request's seed)
    primary: jax.Array  # the row whose choice this row follows (itself, or a guided row for its partner)
    uncond_row: jax.Array  # the row holding this row's unconditional partner, or -1
    prompt_len: jax.Array


@struct.dataclass
class SamplingState:
    """The decode loop's carry: everything that changes from one step to the next."""

    grid: GridState
    logits: jax.Array  # [R, V] float32: the next token's logits of each row
    cache: Cache
    out: jax.Array  # [R, max_new] the ids emitted so far
    n_out: jax.Array  # [R] how many
    done: jax.Array  # [R]
    step: jax.Array  # [] steps run


def check_room(r: Request, positions: int, which: str = "the") -> None:
    """A ValueError unless the model's `positions` leave `r` room for an answer, and a fixed-size
    picture's budget (and that room) holds the whole picture (`which` names the request)."""
    longest = r.longest_prompt
    whose = "prompt" if longest == len(r.tokens) else "unconditional context (uncond_tokens)"
    room = positions - longest
    if room < 1:  # (a conversation that fills the model: the error its encoding raises past the length)
        raise SequenceTooLong(f"{which} {whose} takes {longest} positions: none of the model's {positions} is left "
                              "for an answer")
    # (a picture request's; a chat answer's size, forced for a model that draws one, is of a picture it
    # may draw: one its budget cuts is completed, as a free one is, and an answer in words needs no room)
    if r.grid_hw is not None and r.starts_in_picture:
        need = layout.generated_image_length(r.grid_hw) - 1  # after the prompt's <racm3:break>
        if min(r.max_new_tokens, room) < need:
            held = (f"max_new_tokens={r.max_new_tokens}" if r.max_new_tokens < need else
                    f"the {room} positions the model has after the {whose}'s {longest}")
            raise ValueError(f"{held} cannot hold a {r.grid_hw[0] * 32}x{r.grid_hw[1] * 32} image ({need} "
                             "tokens after <racm3:break>)")


def _row_params(rows, primary, uncond_row, prompt_len, positions: int | None = None) -> RowParams:
    """Each row's parameters; a row stops at `max_new_tokens` or, given the model's `positions`,
    at its last position after the request's prompt, whichever comes first (a guided request's
    unconditional row with it)."""
    def per(f, dtype):
        return np.array([f(r) for r, *_ in rows], dtype)

    n_stop = max(len(r.stop_tokens) for r, *_ in rows)
    stop = np.array([list(r.stop_tokens) + [-1] * (n_stop - len(r.stop_tokens)) for r, *_ in rows], np.int32)
    return RowParams(
        temperature=per(lambda r: r.temperature, np.float32), top_k=per(lambda r: r.top_k, np.int32),
        top_p=per(lambda r: r.top_p, np.float32), image_temperature=per(lambda r: r.image_temperature, np.float32),
        image_top_k=per(lambda r: r.image_top_k, np.int32), image_top_p=per(lambda r: r.image_top_p, np.float32),
        cfg_scale=per(lambda r: r.cfg_scale, np.float32),
        max_new=per(lambda r: min(r.max_new_tokens, (positions or math.inf) - r.longest_prompt), np.int32),
        stop_tokens=stop, key=jax.vmap(jax.random.key)(jnp.array([r.seed for r, *_ in rows], jnp.uint32)),
        primary=primary, uncond_row=uncond_row, prompt_len=prompt_len)


def _initial_grid(rows) -> GridState:
    for b, (_, t, *_) in enumerate(rows):
        inside = [i for i in t if i in (layout.IMAGE_START, layout.IMAGE_END)]
        if inside and inside[-1] == layout.IMAGE_START and t[-1] != layout.IMAGE_START:
            raise ValueError(f"prompt {b} ends inside an image; end it with <eoss> or exactly at <racm3:break>")
    requests = [r for r, *_ in rows]
    return GridState.start([t[-1] for _, t, *_ in rows], [r.grid_hw or (0, 0) for r in requests],
                           [r.max_grid for r in requests], [r.allow_images for r in requests],
                           [r.stop_after_image for r in requests])


def code_logit_count(config) -> int:
    """The logits a step that can only draw image codes computes (a text-only decoder's
    vocabulary may end before the codes)."""
    return min(grid.CODE_LOGITS, config.decoder.vocab_size)


def _copy_bytes(params, head_prefix: int) -> int:
    """Bytes an unrolled loop's own parameters add (`cpu_decode_params`): the stacked layer weights,
    and the LM head's first `head_prefix` columns (and their int8 scales) stored apart."""
    nbytes = lambda a: int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize  # noqa: E731
    total = sum(nbytes(a) for part in ("decoder", "vit") if part in params
                for a in jax.tree.leaves(params[part].get("layers", {})))
    head = params.get("decoder", {}).get("lm_head", {})
    for name in ("kernel", "kernel_scale"):
        if name in head:
            a = head[name]
            total += nbytes(a) * min(head_prefix, a.shape[-1]) // a.shape[-1]
    return total


def _copy_fits(nbytes: int) -> bool:
    """Whether a copy of `nbytes` leaves this host at least as much free memory as it takes."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX host: assume it fits
        return True
    return 2 * nbytes <= free


def _device_copy_fits(nbytes: int, device) -> bool:
    """Whether a copy of `nbytes` leaves an accelerator at least as much free memory as it takes
    (its allocator's limit less what is in use); False where the device does not say."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return False
    return 2 * nbytes <= stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def auto_layers(config, params, devices: Sequence) -> str:
    """What `DecodeLoop(layers="auto")` runs on `devices` (the loop's: its mesh's, or the default
    device alone): "unrolled" for float weights on a CPU, or on one GPU, where the loop's copy of
    the layer weights fits (twice its size free: host memory on a CPU, the GPU's own); "scan"
    otherwise. Measured: on a CPU a scanned step copies each layer's slice out before its dots
    (benchmarks/results/decode.md); on an H200 the 7B's model-only step at 2 rows took 12.2 ms
    scanned and 4.1 ms unrolled (benchmarks/results/decode_accel.md). int8 weights scan (on a CPU
    XLA converts every unrolled layer's kernels to float at once; not measured unrolled on a GPU),
    and so do TPUs and meshes of several GPUs (not measured there; the AOT fit tables are made for
    the scanned loop). A CPU's devices, several of them too (a fake mesh), unroll float weights."""
    if config.quantize != "none" or not devices:
        return "scan"
    nbytes = _copy_bytes(params, code_logit_count(config))
    if all(d.platform == "cpu" for d in devices):
        return "unrolled" if _copy_fits(nbytes) else "scan"
    if len(devices) == 1 and devices[0].platform == "gpu":
        return "unrolled" if _device_copy_fits(nbytes, devices[0]) else "scan"
    return "scan"


@dataclasses.dataclass
class _KeptCache:
    """What a `generate(reuse_cache=True)` call leaves for the next: its row's KV cache and the
    inputs whose keys and values its first `len(tokens)` slots hold."""

    tokens: np.ndarray  # [n] ids: the prompt, then the tokens drawn and fed back
    is_continuous: np.ndarray  # [n]
    feature_index: np.ndarray  # [n]
    pixels: np.ndarray | None  # the request's pictures, which the continuous positions' features come from
    cache: Cache


@dataclasses.dataclass
class Generation:
    tokens: list[np.ndarray]  # generated ids of each request (prompt excluded)


@functools.lru_cache(maxsize=None)
def _steps(config, layers: str, cache_dtype, ok_ids: bytes, mesh) -> "_Steps":
    return _Steps(config, layers, cache_dtype, np.frombuffer(ok_ids, bool), mesh)


class _Steps:
    """A decode loop's compiled steps, one set per model config, layout, cache dtype, drawable ids
    and mesh in a process (`_steps`): a second model of the same shape (another checkpoint, a
    fine-tuned copy, the same one loaded again) reuses the programs its first compiled instead
    of tracing and compiling them again. It holds no parameters (they are arguments), so keeping
    it keeps no model alive."""

    def __init__(self, config, layers: str, cache_dtype, ok_ids: np.ndarray, mesh):
        self.config, self.cache_dtype, self._ok_ids, self.mesh = config, cache_dtype, ok_ids, mesh
        self.module = UniToken(config.replace(scan_layers=True) if layers == "scan" else cpu_decode_config(config))
        self._code_logits = code_logit_count(config)

    def _apply(self, params, *args, **kwargs):
        return self.module.apply({"params": params}, *args, **kwargs)

    @functools.cached_property
    def prefill(self):
        def prefill(params, tokens, segments, cont, index, pixels, cache_len):
            b, length = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
            last = jnp.sum(segments, axis=1) - 1
            logits, cache = self._apply(params, tokens, positions, segments, cont if pixels is not None else None,
                                        index if pixels is not None else None, pixels, logits_at_B=last,
                                        new_cache=(cache_len, self.cache_dtype))
            return logits[:, 0], cache

        return jax.jit(prefill, static_argnums=(6,))

    @functools.cached_property
    def run(self):
        vocab, codes = self.config.decoder.vocab_size, self._code_logits

        def run(params, s: SamplingState, p: RowParams, chunk_end, n_requests):
            def cond(s: SamplingState):
                return (s.step < chunk_end) & ~jnp.all(s.done)

            def draw(s: SamplingState, width: int):
                """The requests' rows (the first `n_requests`; an unconditional partner follows its
                row) sample from the first `width` logits."""
                g = jax.tree.map(lambda a: a[:n_requests], s.grid)
                q = jax.tree.map(lambda a: a[:n_requests], p)
                in_img = grid.in_image(g)
                lg = sampling.classifier_free_guidance(s.logits[:, :width], q.uncond_row, q.cfg_scale,
                                                       g.mode == grid.BODY)
                lg = jnp.where(grid.allowed(g, width) & jnp.asarray(self._ok_ids[:width])[None], lg, sampling.NEG_INF)
                temp = jnp.where(in_img, q.image_temperature, q.temperature)
                row_keys = jax.vmap(jax.random.fold_in)(q.key, s.n_out[:n_requests])
                return sampling.sample(lg, row_keys, temp, jnp.where(in_img, q.image_top_k, q.top_k),
                                       jnp.where(in_img, q.image_top_p, q.top_p))

            def body(s: SamplingState) -> SamplingState:
                g = s.grid
                # while every row draws codes (or is forced, or done), only the code logits can win
                tok = jax.lax.cond(grid.codes_only(jax.tree.map(lambda a: a[:n_requests], g)),
                                   lambda: draw(s, codes), lambda: draw(s, vocab))
                tok = jnp.take(tok, p.primary)  # unconditional rows follow their row's choice
                r = jnp.arange(tok.shape[0])
                # an unconditional partner's context starts at <racm3:break>: it waits (no token, no
                # cache write, its logits kept) while its row is outside an image, e.g. while a
                # chat answer writes text before it draws
                waiting = (p.primary != r) & ~jnp.take(grid.in_image(g), p.primary)
                active = ~s.done & ~waiting
                # a partner that wakes after a picture (its own grid back in text) starts again from
                # its own prompt, as the reference's CFG does at each <racm3:break>: its next token
                # goes to the slot after that prompt (the last picture's slots are masked, then
                # overwritten) and it follows the new picture's grid (its forced tokens too)
                restart = active & (p.primary != r) & (g.mode == grid.TEXT)
                g = g.replace(mode=jnp.where(restart, grid.HEIGHT, g.mode))
                cache = {**s.cache, "index": jnp.where(restart, p.prompt_len, s.cache["index"])}
                forced = grid.forced_token(g)
                tok = jnp.where(forced >= 0, forced, tok)
                n_out = jnp.where(restart, 0, s.n_out)
                slot = jnp.where(active, n_out, s.out.shape[1])  # finished rows write nowhere
                out = s.out.at[r, slot].set(tok, mode="drop")
                n_out = n_out + active
                stop = jnp.any(tok[:, None] == p.stop_tokens, axis=1)
                new_grid = grid.advance(g, tok, stop)
                g = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_grid, g)
                done = s.done | (g.mode == grid.DONE) | (n_out >= p.max_new)
                done = jnp.take(done, p.primary)
                feed = active & ~done
                positions = (p.prompt_len + n_out - 1)[:, None]
                hidden, cache = self._apply(params, tok[:, None], positions, feed[:, None].astype(jnp.int32),
                                            cache=cache, return_hidden=True)

                def code_logits(h):  # only image codes can be drawn next: 1/8 of the projection
                    part = self._apply(params, h, codes, method=UniToken.head)
                    return jnp.pad(part, ((0, 0), (0, 0), (0, vocab - codes)),
                                   constant_values=sampling.NEG_INF)

                logits = jax.lax.cond(grid.codes_only(g), code_logits,
                                      lambda h: self._apply(params, h, method=UniToken.head), hidden)
                logits = jnp.where(waiting[:, None], s.logits, logits[:, 0])
                return SamplingState(grid=g, logits=logits, cache=cache, out=out, n_out=n_out, done=done,
                                     step=s.step + 1)

            return jax.lax.while_loop(cond, body, s)

        return jax.jit(run, static_argnums=(4,), donate_argnums=(1,))

    @functools.cached_property
    def grow(self):
        def grow(cache, length):
            def pad(buffer):  # [..., S, H]: zeros in the new slots, which no row has reached
                widths = [(0, 0)] * buffer.ndim
                widths[-2] = (0, length - buffer.shape[-2])
                return jnp.pad(buffer, widths)

            return {"k": jax.tree.map(pad, cache["k"]), "v": jax.tree.map(pad, cache["v"]), "index": cache["index"]}

        return jax.jit(grow, static_argnums=(1,))  # (a larger output cannot reuse the old buffers)

    @functools.cached_property
    def extend(self):
        def extend(params, cache, tokens, segments, cont, index, pixels):
            positions = cache["index"][:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
            last = jnp.sum(segments, axis=1) - 1
            logits, cache = self._apply(params, tokens, positions, segments, cont if pixels is not None else None,
                                        index if pixels is not None else None, pixels, cache=cache, logits_at_B=last)
            return logits[:, 0], cache

        return jax.jit(extend, donate_argnums=(1,))

    @functools.cached_property
    def add_row(self):
        def add_row(cache):  # an empty row after the kept one (batch: axis 0 of a layer's buffer, 1 stacked)
            def add(buffer, axis):
                return jnp.concatenate([buffer, jnp.zeros_like(buffer)], axis=axis)

            def add_kv(buffers):
                return tuple(add(a, 0) for a in buffers) if isinstance(buffers, tuple) else add(buffers, 1)

            return {"k": add_kv(cache["k"]), "v": add_kv(cache["v"])}

        return jax.jit(add_row)  # (the output is larger: the input cannot be reused)

    @functools.cached_property
    def first_row(self):
        def first_row(cache):
            def take(buffers):
                return tuple(a[:1] for a in buffers) if isinstance(buffers, tuple) else buffers[:, :1]

            return {"k": take(cache["k"]), "v": take(cache["v"]), "index": cache["index"][:1]}

        return jax.jit(first_row)


class DecodeLoop:
    """Compiled prefill and decode loop for one model; call `generate(requests)`."""

    def __init__(self, config, params, mesh=None, cache_dtype=None, banned_ids=None, layers: str = "auto",
                 cache_growth: int | None = None, prompt_multiple: int = PROMPT_MULTIPLE,
                 cache_block: int | None = None):
        """`banned_ids`: ids never drawn (e.g. the image codes a small VQ-GAN's codebook lacks).

        `prompt_multiple`: the prefill's width (the longest prompt of a call) is padded up to a
        multiple of this, so prompts whose lengths differ by a few tokens share one compiled
        prefill and loop, in this process and in the persistent compilation cache (each new width
        compiles both again: a CLI call of the bundled model with a new prompt length took 4.3 s
        instead of 2.8, benchmarks/results/cli_latency.md). The padding is masked (no position
        attends to it) and the tokens drawn do not change; a step reads up to
        `prompt_multiple - 1` more cache slots. 1 = no padding.

        `cache_growth` (unrolled layers only): the cache grows to the next multiple of this many
        slots instead of `default_growth`'s (as many sizes as doubling would take), so a step
        reads fewer unfilled slots at the price of a compile per size (`_capacities`).

        `layers`: how the compiled steps run the layer stack. "scan" loops over the stacked
        parameters and a stacked KV cache; "unrolled" holds a copy of each layer's parameters and
        a KV buffer per layer. On a CPU, a scanned layer's slice of the stacked weights and cache is
        copied out before its dots read it, which made a 16-row decode step of the 8-layer
        benchmark model 3x what its arithmetic costs; on an H200 the 7B's scanned step was 3x its
        unrolled one. Unrolled, the loop keeps its own copy of the decoder's (and SigLIP's) layer
        weights beside the model's, laid out as a CPU's dots read them without a copy at each step
        (`models.unitoken.cpu_decode_params`: q/k/v kernels [embed, heads, head_dim], the LM
        head's image-code columns stored apart). "auto" (`auto_layers`) unrolls float weights on a
        CPU or on one GPU where twice that copy is free, and scans otherwise: int8 weights
        (unrolled, XLA's CPU converts every layer's int8 kernels to float together: a float copy of
        the weights), TPUs and meshes of several devices.

        `cache_block` (scanned layers only): a step's attention reads the stacked KV cache this many
        slots at a time, and only the blocks below the furthest slot any row has reached, with no
        copy of a layer's slice (`models.layers.attend_filled`); 0 reads every slot, as one
        product. None: `CPU_CACHE_BLOCK` on a CPU, 0 elsewhere (on an H200, blocks of 256 made the
        7B's int8 step of 8 images with CFG slower than reading every slot)."""
        if layers not in ("auto", "scan", "unrolled"):
            raise ValueError(f"layers={layers!r}: expected 'auto', 'scan' or 'unrolled'")

        def positive(n):
            return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1

        if cache_growth is not None and not positive(cache_growth):
            raise ValueError(f"cache_growth={cache_growth!r}: expected a positive number of slots, or None "
                             "(as many sizes as doubling takes, evenly spaced)")
        if not positive(prompt_multiple):
            raise ValueError(f"prompt_multiple={prompt_multiple!r}: expected a positive number of tokens "
                             "(1 = no padding)")
        if cache_block is not None and not (isinstance(cache_block, (int, np.integer)) and not isinstance(
                cache_block, bool) and cache_block >= 0):
            raise ValueError(f"cache_block={cache_block!r}: expected a number of slots (0 = read every slot at "
                             "each step), or None (the platform's default)")
        self.cache_growth = cache_growth
        self.prompt_multiple = int(prompt_multiple)
        self.config = config
        self.mesh = mesh
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
        on_cpu = all(d.platform == "cpu" for d in devices)
        if layers == "auto":
            layers = auto_layers(config, params, devices)
        if cache_growth is not None and layers != "unrolled":  # (it was taken and did nothing)
            raise ValueError(f"cache_growth={cache_growth} acts on unrolled layers only; these run scanned (a TPU's, a "
                             "GPU mesh's, int8 weights' or layers='scan'), whose loop keeps one full-length cache: leave it out, or "
                             "unroll the layers (layers='unrolled', --layers unrolled)")
        self.layers = layers
        if cache_block is None:  # benchmarks/results/decode_blocks.md (CPU), decode_accel.md (H200)
            cache_block = CPU_CACHE_BLOCK if on_cpu else 0
        self.cache_block = int(cache_block)
        self.params = params
        # in the type the loop attends in (float32 on a CPU for 16-bit models): no conversion a step
        platform = "cpu" if on_cpu else devices[0].platform
        self.cache_dtype = jnp.dtype(cache_dtype or attention_dtype(config.dtype, platform))
        ok = np.ones(config.decoder.vocab_size, bool)
        if banned_ids is not None and len(banned_ids):
            ok[np.asarray(banned_ids)] = False
        self._ok_ids = ok

    @property
    def params(self):
        """The parameters as the compiled steps take them (unrolled if `layers` is)."""
        return self._params

    @params.setter
    def params(self, params):
        """Takes the model's (scanned-layout) parameters."""
        if self.layers == "unrolled":
            def layout(p):
                return cpu_decode_params(p, self.config, head_prefix=code_logit_count(self.config))

            if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params)):
                params = jax.eval_shape(layout, params)
            else:
                params = layout(params)
        self._params = params
        self._kept = None  # a cache kept for `generate(reuse_cache=True)` holds these parameters' keys

    @property
    def _steps(self) -> "_Steps":
        config = self.config
        if self.layers == "scan" and self.cache_block:
            config = config.replace(decoder=dataclasses.replace(config.decoder, cache_block=self.cache_block))
        return _steps(config, self.layers, self.cache_dtype, self._ok_ids.tobytes(), self.mesh)

    def _apply(self, params, *args, **kwargs):
        return self._steps._apply(params, *args, **kwargs)

    # each instance's own handle on a shared program (tests wrap one loop's to count its calls)
    _prefill, _run, _grow, _extend, _add_row, _first_row = (
        functools.cached_property(operator.attrgetter(f"_steps.{name}"))
        for name in ("prefill", "run", "grow", "extend", "add_row", "first_row"))

    def _prepare(self, requests: Sequence[Request]):
        """Host side of a generation: the prefill's batch, each row's parameters and the sizes."""
        rows, primary, uncond_row = _rows(requests)
        batch = _build_batch(rows, self.config.vision.features_per_image if self.config.vision else None,
                             self.prompt_multiple)
        positions = self.config.decoder.max_position_embeddings
        for i, r in enumerate(requests):
            check_room(r, positions, f"request {i}'s")
        *prefill_batch, prompt_len = batch
        params = _row_params(rows, primary, uncond_row, prompt_len, positions)
        # the buffers' sizes depend on the requests' budgets and the model, not on where a row's
        # positions run out: a conversation's turns share them (and their compiled loop)
        width = prefill_batch[0].shape[1]
        max_new = min(max(r.max_new_tokens for r in requests), positions)
        cache_len = min(width + max_new, max(width, positions))  # no row's index passes the model's positions
        return rows, tuple(prefill_batch), params, max_new, cache_len

    @staticmethod
    def _initial_state(rows, logits, cache, max_new: int) -> SamplingState:
        n = len(rows)
        return SamplingState(grid=jax.tree.map(jnp.asarray, _initial_grid(rows)), logits=logits, cache=cache,
                             out=jnp.zeros((n, max_new), jnp.int32), n_out=jnp.zeros(n, jnp.int32),
                             done=jnp.zeros(n, bool), step=jnp.zeros((), jnp.int32))

    def _capacities(self, prompt: int, max_new: int, chunk: int, full: int | None = None) -> list[int]:
        """The cache's length for each chunk of `chunk` decoding steps after a `prompt`-long
        prefill (the first: the prefill's), up to `max_new` steps, at most `full` (default
        `prompt + max_new`; `_prepare`'s cache length).

        Unrolled (on a CPU or one GPU), the cache grows as the rows do, to the next multiple of a step (at most
        the full length; `cache_growth`, else `default_growth`): each step's attention reads every
        slot of the cache, filled or not, and at 16 rows over a 512 x 512 picture's 1,100
        positions that reading is most of the step. Each length compiles the loop once more (4 in
        all for that picture by default), and growing holds the old and the new cache at once,
        which is why a scanned loop (a TPU's, where AOT fit tables are made at the full
        length) keeps one full cache, except for a chat turn (`_doubling`)."""
        full = prompt + max_new if full is None else full
        ends = _chunk_ends(max_new, chunk)
        if self.layers != "unrolled":
            return [full] * len(ends)
        growth = self.cache_growth or default_growth(prompt + ends[0], full)
        return [min(full, -(-(prompt + end) // growth) * growth) for end in ends]

    def _doubling(self, prompt: int, max_new: int, chunk: int, full: int, base: int) -> list[int]:
        """`_capacities` for a chat turn on scanned layers: each chunk's cache is the first length
        of the doubling chain from `base` (the kept cache's, else `MIN_CAPACITY`) that holds what
        the chunk's rows reach, at most the model's positions. The cache follows the conversation
        rather than its budget (a turn's loop reads the slots the rows use, not prompt + budget),
        and every conversation's turns share a few lengths, so a few loop programs."""
        top = max(full, self.config.decoder.max_position_embeddings)
        sizes, size = [], base
        for end in _chunk_ends(max_new, chunk):
            while size < min(prompt + end, full):
                size = min(2 * size, top)
            sizes.append(size)
        return sizes

    def start_within(self, n: int, start: int, length: int, least: int = 0) -> int:
        """Where to write positions `start`..`n` of a prompt over a cache of `length` slots that holds
        its first `start`: `start`, else the multiple of `prompt_multiple` below it, whichever lets
        the rest's padding (at least `least` wide) end within the cache; else 0 (all of it)."""
        m = self.prompt_multiple
        return next((s for s in (start, start - start % m) if s + prefill_width(max(n - s, least), m) <= length), 0)

    def _reusable(self, kept: _KeptCache, request: Request) -> int:
        """How many of `request`'s first positions the kept cache holds already: the longest common
        prefix of the two inputs (ids, and for a continuous position the same feature of an
        identical picture), short of the prompt's last position, whose logits draw the first token."""
        tokens = request.tokens
        n = min(len(kept.tokens), len(tokens) - 1)
        if n <= 0:
            return 0
        cont = request.is_continuous[:n] if request.is_continuous is not None else np.zeros(n, bool)
        same = (kept.tokens[:n] == tokens[:n]) & (kept.is_continuous[:n] == cont)
        if cont.any():
            index = request.feature_index[:n]
            if kept.pixels is None or kept.pixels.shape[1:] != request.pixels.shape[1:]:
                same &= ~cont
            else:
                per_image = self.config.vision.features_per_image(request.pixels.shape[1:3])
                shared = min(len(kept.pixels), len(request.pixels))
                identical = np.array([np.array_equal(kept.pixels[i], request.pixels[i]) for i in range(shared)]
                                     + [False])
                picture = np.minimum(index // per_image, shared)
                same &= ~cont | ((kept.feature_index[:n] == index) & identical[picture])
        return n if same.all() else int(np.argmin(same))

    def _rest_batch(self, request: Request, start: int, partner: bool = True):
        """`_build_batch` of `request`'s positions from `start` on, with only the pictures those
        positions take features from, and (`partner`, a guided request) its unconditional row."""
        cont = index = pixels = None
        if request.is_continuous is not None and request.is_continuous[start:].any():
            cont, index = request.is_continuous[start:], np.asarray(request.feature_index[start:])
            per_image = self.config.vision.features_per_image(request.pixels.shape[1:3])
            used = np.unique(index[cont] // per_image)
            index = np.where(cont, np.searchsorted(used, index // per_image) * per_image + index % per_image, 0)
            pixels = request.pixels[used]
        rest = dataclasses.replace(request, tokens=request.tokens[start:], is_continuous=cont, feature_index=index,
                                   pixels=pixels)
        rows = _rows([rest])[0] if partner else [(rest, rest.tokens, cont, index, pixels)]
        *batch, _ = _build_batch(rows, self.config.vision.features_per_image if self.config.vision else None,
                                 self.prompt_multiple)
        return batch

    def _extend_from(self, cache: Cache, request: Request, start: int, capacity: int):
        """(first logits, cache) of `request` from a kept `cache` whose first `start` slots hold its
        first positions: the cache grown to `capacity` slots where it is shorter (`_capacities`,
        `_doubling`), the rest of the prompt written after them. The cache goes to the computation
        (donated)."""
        if cache_length(cache) < capacity:
            cache = self._grow(cache, capacity)
        guided = request.cfg_scale != 1.0
        # a partner row's prompt is prefilled from 0 beside it: the extend is at least that wide
        start = self.start_within(len(request.tokens), start, cache_length(cache),
                                  least=len(request.uncond_tokens) if guided else 0)
        if guided:  # the unconditional partner: a second row, prefilled from its start
            cache = self._add_row(cache)
        cache = {**cache, "index": jnp.asarray([start, 0][:1 + guided], jnp.int32)}
        return self._extend(self.params, cache, *self._rest_batch(request, start))

    def _keep(self, request: Request, state: SamplingState, drawn: np.ndarray) -> None:
        """Keeps the one row's cache and what its filled slots hold (the prompt, then the `drawn`
        ids fed back), for the next call to reuse."""
        fed = int(jax.device_get(state.cache["index"])[0])
        ids = np.concatenate([request.tokens, drawn]).astype(np.int32)
        if fed > len(ids):
            raise AssertionError(f"the cache holds {fed} positions, more than the {len(ids)} given and drawn")
        n = len(request.tokens)
        cont, index = np.zeros(fed, bool), np.zeros(fed, np.int32)
        if request.is_continuous is not None:
            cont[:n], index[:n] = request.is_continuous, request.feature_index
        cache = state.cache if state.cache["index"].shape[0] == 1 else self._first_row(state.cache)
        self._kept = _KeptCache(ids[:fed], cont, index, request.pixels, cache)

    def generate(self, requests: Sequence[Request], *, chunk: int = 64,
                 progress: Callable[[dict], Sequence[int] | None] | None = None,
                 reuse_cache: bool = False) -> Generation:
        """Decodes the requests as one batch. `progress(info)`, after every chunk of steps, gets the
        rows' tokens so far and may return the indices of requests to end there (a stop string
        seen): they generate nothing more, as if they had ended. `reuse_cache` (a single request,
        e.g. a chat's next turn): the positions its prompt shares with the last such call's prompt and answer are
        taken from that call's KV cache instead of being computed again (a guided request's
        unconditional partner is prefilled beside it), and this call's row's cache is kept for the
        next (on the device, until a call that does not reuse it). A turn then prefills only its
        new messages, and compiles only where their padded width or the cache's length is new; with
        scanned layers the cache grows by doubling as the rows need it (`_doubling`: from 256, up to
        the model's positions, whatever the budget) (benchmarks/chat_turns.py)."""
        kept, self._kept = self._kept, None  # a call that does not reuse the cache frees it
        rows, batch, params, max_new, cache_len = self._prepare(requests)
        reuse_cache = reuse_cache and len(requests) == 1  # (a guided one's partner row is not kept)
        start = self._reusable(kept, requests[0]) if reuse_cache and kept is not None else 0
        if reuse_cache and self.layers != "unrolled":  # a scanned loop's chat: the cache doubles as rows need
            capacities = self._doubling(batch[0].shape[1], max_new, chunk, cache_len,
                                        cache_length(kept.cache) if start else MIN_CAPACITY)
        else:
            capacities = self._capacities(batch[0].shape[1], max_new, chunk, cache_len)
        if not start:
            kept = None
        with sharding.mesh_context(self.mesh):
            if start:
                cache, kept = kept.cache, None
                logits, cache = self._extend_from(cache, requests[0], start, capacities[0])
            else:
                logits, cache = self._prefill(self.params, *batch, capacities[0])
            state = self._initial_state(rows, logits, cache, max_new)
            params = jax.tree.map(jnp.asarray, params)
            step = 0
            for capacity in capacities:
                step = min(step + chunk, max_new)
                if capacity > cache_length(state.cache):
                    state = state.replace(cache=self._grow(state.cache, capacity))
                state = self._run(self.params, state, params, jnp.int32(step), len(requests))
                if progress is not None:
                    ended = progress(jax.device_get({"rows_drawn": state.grid.row,
                                                     "images_done": state.grid.images_done,
                                                     "n_out": state.n_out, "out": state.out}))
                    if ended:  # requests the caller ends now (e.g. a stop string): their rows and partners
                        rows_ended = jnp.isin(params.primary, jnp.asarray(sorted(ended), jnp.int32))
                        state = state.replace(done=state.done | rows_ended, grid=state.grid.replace(
                            mode=jnp.where(rows_ended, grid.DONE, state.grid.mode)))
                if step >= max_new or bool(jnp.all(state.done)):
                    break
        out, n_out = np.asarray(state.out), np.asarray(state.n_out)
        if reuse_cache:
            self._keep(requests[0], state, out[0, :n_out[0]])
        return Generation([out[i, :n_out[i]] for i in range(len(requests))])

    def lower(self, requests: Sequence[Request]):
        """(prefill, decode loop), lowered for these requests' shapes, exactly as `generate` runs
        them. `self.params` may be ShapeDtypeStructs with shardings (nothing is allocated), and the
        mesh a TPU topology's: `launch/aot_check.py decode` compiles a release for a chip this way."""
        rows, batch, params, max_new, cache_len = self._prepare(requests)
        replicated = NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else None

        def spec(x, sharding_=None):
            return None if x is None else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding_ or replicated)

        with sharding.mesh_context(self.mesh):
            prefill = self._prefill.lower(self.params, *(spec(x) for x in batch), cache_len)
            logits, cache = prefill.out_info
            # the cache enters the loop as the prefill leaves it (sharded by its logical axes), as in generate
            try:
                cache_sharding = prefill.compile().output_shardings[1]
            except jax.errors.JaxRuntimeError:  # e.g. a prefill too big for the chip: lower the loop anyway
                cache_sharding = jax.tree.map(lambda _: None, cache)
            state = jax.eval_shape(lambda lg, c: self._initial_state(rows, lg, c, max_new), logits, cache)
            state = state.replace(cache=jax.tree.map(lambda a, sh: spec(a, sh), state.cache, cache_sharding))
            state = jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is not None
                                 else spec(a), state)
            loop = self._run.lower(self.params, state, jax.tree.map(spec, params), spec(np.int32(0)), len(requests))
        return prefill, loop
