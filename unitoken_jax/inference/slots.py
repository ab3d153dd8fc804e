"""Continuous batching: a fixed number of rows (slots) decoding in one compiled loop, with requests
admitted into free slots between chunks and finished ones leaving.

    decoder = SlotDecoder(pipe.decode_loop, slots=8, length=512)
    decoder.admit("a", request_a)              # prefilled into a free slot (two for a guided picture)
    while decoder.busy:
        for name, tokens in decoder.step().items():   # one chunk of the compiled loop
            ...                                       # `name` finished: its generated ids
        decoder.admit("b", request_b)          # whenever slots are free, even mid-way through "a"

The slots share one persistent KV cache (per layer: [slots, kv_heads, length, head_dim]) and one
`SamplingState`; each slot row has its own `RowParams` entry (sampling options, key, stop ids,
grid limits), so a request samples exactly what it samples alone: its noise is drawn from its own
seed and its own count of emitted tokens (`sampling`), its grid state is its own, and an
unconditional partner occupies a second slot and follows its row's choices (`DecodeLoop`). The
loop is `DecodeLoop`'s own, run over all slots; a free slot is a finished row, which the loop
neither samples for nor writes to the cache.

Admission prefills the new rows alone (prompt length and row count padded to powers of two, so few
shapes compile) and writes their keys, values, first logits and fresh state into their slots on
the device; nothing else moves. Shapes the loop compiles for: the slot count and cache length
(fixed).

A free slot keeps what its last request's row left in the cache (the prompt and the answer's ids).
A request whose prompt starts with what a free slot holds (a conversation's next turn: the client
sends the history again) is admitted into that slot and only the rest of its prompt is computed,
on top of the kept keys and values (`DecodeLoop._extend`, the rest padded to a power of two; a
guided request's unconditional partner is prefilled as usual); it samples what a full prefill
samples. `reused_positions` counts the positions taken so. A request that continues none takes an
empty slot, else the one whose cache was kept longest ago.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from unitoken_jax import sharding
from unitoken_jax.inference.decode import (
    DecodeLoop,
    Request,
    RowParams,
    SamplingState,
    _build_batch,
    _initial_grid,
    _KeptCache,
    _row_params,
    _rows,
    check_room,
)
from unitoken_jax.inference.grid import DONE, GridState
from unitoken_jax.models.chameleon import init_cache


MIN_REUSE = 32  # positions a request must share with a free slot's kept cache to be admitted into it


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass
class _Running:
    request: Request
    slots: list[int]  # its row, then its unconditional partner's if guided


class SlotDecoder:
    """`slots` rows of `length` positions (prompt + new tokens) each; see the module docstring."""

    def __init__(self, loop: DecodeLoop, slots: int, length: int, chunk: int = 16):
        if slots < 1 or length < 2 or chunk < 1:
            raise ValueError(f"slots={slots}, length={length}, chunk={chunk}: need slots >= 1, length >= 2, chunk >= 1")
        self.loop, self.n_slots, self.length, self.chunk = loop, slots, length, chunk
        self.running: dict[Hashable, _Running] = {}
        self._free = list(range(slots))
        self._held: dict[int, _KeptCache] = {}  # a free slot -> what its cache holds (ids, pictures; no arrays)
        self.reused_positions = 0  # prompt positions taken from free slots' caches instead of computed
        config = loop.config
        self._vocab = config.decoder.vocab_size
        n, z = slots, np.zeros(slots, np.int32)
        # host copies of every slot's parameters (free slots: a greedy row that is done)
        self._params = {f.name: np.asarray(getattr(_row_params(*self._dummy_rows(1)), f.name)).repeat(n, 0)
                        for f in dataclasses.fields(RowParams) if f.name not in ("key", "stop_tokens")}
        self._params.update(primary=np.arange(n, dtype=np.int32), uncond_row=np.full(n, -1, np.int32), prompt_len=z)
        self._seeds = np.zeros(n, np.uint32)
        self._stop = np.full((n, 1), -1, np.int32)
        self._device_params = None  # RowParams on the device, rebuilt after an admission or a release
        self.state = self._empty_state()

    def _empty_state(self) -> SamplingState:
        """Every slot free: finished rows over an empty cache."""
        loop, n = self.loop, self.n_slots
        with sharding.mesh_context(loop.mesh):
            # the layout the loop's layers read: a buffer per layer when they are unrolled
            cache = init_cache(loop.config.decoder, n, self.length, loop.cache_dtype,
                               per_layer=loop.layers == "unrolled")
            grid = jax.tree.map(jnp.asarray, _initial_grid(self._dummy_rows(n)[0]))
            return SamplingState(grid=grid.replace(mode=jnp.full(n, DONE, jnp.int32)),
                                 logits=jnp.zeros((n, self._vocab), jnp.float32), cache=cache,
                                 out=jnp.zeros((n, self.length), jnp.int32), n_out=jnp.zeros(n, jnp.int32),
                                 done=jnp.ones(n, bool), step=jnp.zeros((), jnp.int32))

    def reset(self) -> None:
        """Forgets every running request and kept cache: all slots free, over a new state (the
        old one may be gone: the loop and the admission donate it, and a run that fails on the
        device has consumed it)."""
        self.running.clear()
        self._held.clear()
        self._free = list(range(self.n_slots))
        self._params["primary"][:] = np.arange(self.n_slots)
        self._params["uncond_row"][:] = -1
        self._device_params = None
        self.state = None  # (the old arrays go before the new ones are made)
        self.state = self._empty_state()

    def _recover(self, names) -> None:
        """After a failed admission or chunk: `names` leave their slots; every request does (`reset`)
        when the state did not come through: consumed by the failed run, or its result (an error
        on the device surfaces when the arrays are waited for)."""
        try:
            jax.block_until_ready(self.state)  # (raises for a deleted array, too)
            for name in names:
                self.cancel(name)
        except Exception:
            self.reset()

    @staticmethod
    def _dummy_rows(n: int):
        r = Request(np.array([0], np.int32), max_new_tokens=1)
        rows = [(r, r.tokens, None, None, None)] * n
        return rows, np.arange(n, dtype=np.int32), np.full(n, -1, np.int32), np.ones(n, np.int32)

    # --- what is going on ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.running)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def rows_in_use(self) -> int:
        return self.n_slots - len(self._free)

    @staticmethod
    def slots_needed(request: Request) -> int:
        return 2 if request.cfg_scale != 1.0 else 1

    def partial(self, name: Hashable) -> np.ndarray:
        """The ids `name` has generated so far (for streaming)."""
        row = self.running[name].slots[0]
        n = int(self.state.n_out[row])
        return np.asarray(self.state.out[row, :n])

    # --- admitting and removing --------------------------------------------------------------
    def admit(self, name: Hashable, request: Request) -> list[int]:
        """Prefills `request` into free slots; returns them. A ValueError when it cannot fit."""
        return self.admit_many({name: request})[name]

    def admit_many(self, requests: dict[Hashable, Request]) -> dict[Hashable, list[int]]:
        """Prefills several requests into free slots with one prefill; returns each one's slots.
        A ValueError (and nothing admitted) when one is running already or they do not fit. When
        the prefill fails, none is admitted and the error is raised (see `_recover`)."""
        need = sum(self.slots_needed(r) for r in requests.values())
        if need > len(self._free):
            raise ValueError(f"{', '.join(map(repr, requests))} need {need} free slot(s), {len(self._free)} are free")
        placed, all_rows, all_slots = {}, [], []
        for name, request in requests.items():
            if name in self.running or name in placed:
                raise ValueError(f"{name!r} is running already")
            rows, _, uncond = _rows([request])
            if request.longest_prompt + request.max_new_tokens > self.length:
                raise ValueError(f"a prompt of {request.longest_prompt} positions and {request.max_new_tokens} new "
                                 f"tokens do not fit a slot of {self.length} positions")
            # as `DecodeLoop.generate` refuses them: no room for an answer, or a picture cut by its budget
            check_room(request, self.loop.config.decoder.max_position_embeddings, f"{name!r}:")
            placed[name] = (request, rows, uncond)
        out, extends = {}, []
        for name, (request, rows, uncond) in placed.items():
            slot, start = self._best_slot(request)
            slots = []
            if start:  # the request's row continues a kept cache; a guided one's partner is prefilled
                self._free.remove(slot)
                slots.append(slot)
                extends.append((slot, request, start))
            # slots that hold nothing first, then the cache kept longest ago (`_held` is in the order its
            # caches were kept: one continued is taken out and kept again at the end); the lowest slot
            # number was taken before, and a conversation that had just gone on lost its cache
            age = {s: i for i, s in enumerate(self._held)}
            for _ in rows[len(slots):]:
                slots.append(min(self._free, key=lambda s: (s in age, age.get(s, 0), s)))
                self._free.remove(slots[-1])
            kept = 1 if start else 0  # rows not prefilled: the one continuing a kept cache
            all_rows += rows[kept:]
            all_slots += slots[kept:]
            for slot in slots:
                self._held.pop(slot, None)
            self._set_params(rows, slots, uncond[0] >= 0)
            self.running[name] = _Running(request, slots)
            out[name] = slots
        try:
            if all_rows:
                self._prefill_into(all_rows, all_slots)
            for slot, request, start in extends:
                self._extend_into(slot, request, start)
        except Exception:  # none of them is admitted; the running ones go on unless the state is gone
            self._recover(list(placed))
            raise
        return out

    def _best_slot(self, request: Request) -> tuple[int | None, int]:
        """The free slot whose kept cache holds the most of `request`'s first positions, and how
        many; (None, 0) below `MIN_REUSE` (a shared system prompt alone does not take the slot of
        a conversation that may come back)."""
        best, most = None, MIN_REUSE - 1
        for slot in self._free:
            if slot in self._held:
                start = self.loop.start_within(len(request.tokens), self.loop._reusable(self._held[slot], request),
                                               self.length)
                if start > most:
                    best, most = slot, start
        return (best, most) if best is not None else (None, 0)

    def _extend_into(self, slot: int, request: Request, start: int) -> None:
        """Writes `request`'s positions from `start` on into `slot`, after the `start` its cache holds."""
        loop = self.loop
        tokens, segments, cont, index, pixels = loop._rest_batch(request, start, partner=False)  # (`start_within` chose it)
        width = min(_pow2(tokens.shape[1]), self.length - start)
        if width > tokens.shape[1]:  # a power of two where it fits the slot: few shapes compile
            pad = ((0, 0), (0, width - tokens.shape[1]))
            tokens, segments, cont, index = (np.pad(a, pad) for a in (tokens, segments, cont, index))
        grid = _initial_grid([(request, request.tokens, None, None, None)])
        with sharding.mesh_context(loop.mesh):
            cache = _take_row(self.state.cache, jnp.int32(slot), jnp.int32(start))
            logits, cache = loop._extend(loop.params, cache, tokens, segments, cont, index, pixels)
            self.state = _place(self.state, jnp.asarray([slot], jnp.int32), logits, cache,
                                jax.tree.map(jnp.asarray, grid))
        self.reused_positions += start

    def _hold(self, running: _Running, drawn: np.ndarray, filled: int) -> None:
        """Records what a finished request's row leaves in its slot's cache (`filled` positions):
        its prompt and the `drawn` ids fed back (all but a last stop token)."""
        request, row = running.request, running.slots[0]
        ids = np.concatenate([request.tokens, drawn[:max(0, filled - len(request.tokens))]])
        cont, index = np.zeros(len(ids), bool), np.zeros(len(ids), np.int32)
        if request.is_continuous is not None:
            cont[:len(request.tokens)], index[:len(request.tokens)] = request.is_continuous, request.feature_index
        self._held[row] = _KeptCache(ids.astype(np.int32), cont, index, request.pixels, cache=None)

    def _set_params(self, rows, slots: list[int], guided: bool) -> None:
        self._device_params = None
        primary = slots[0]
        p = self._params
        for j, (slot, (r, toks, *_)) in enumerate(zip(slots, rows)):
            # (a row stops at the model's last position, as in `DecodeLoop.generate`, whatever the slot's length)
            one = _row_params([(r, toks, None, None, None)], np.zeros(1, np.int32), np.full(1, -1, np.int32),
                              np.array([len(toks)], np.int32), self.loop.config.decoder.max_position_embeddings)
            for key in p:
                if key not in ("primary", "uncond_row"):
                    p[key][slot] = np.asarray(getattr(one, key))[0]
            p["primary"][slot] = primary
            p["uncond_row"][slot] = slots[1] if (j == 0 and guided) else -1
            self._seeds[slot] = r.seed
            stop = list(r.stop_tokens)
            if len(stop) > self._stop.shape[1]:
                self._stop = np.pad(self._stop, ((0, 0), (0, len(stop) - self._stop.shape[1])), constant_values=-1)
            self._stop[slot] = stop + [-1] * (self._stop.shape[1] - len(stop))

    def cancel(self, name: Hashable) -> None:
        """Frees `name`'s slots now (a client that went away)."""
        running = self.running.pop(name, None)
        if running is not None:
            self._release(running.slots)

    def _release(self, slots: list[int]) -> None:
        self._device_params = None
        self.state = _mark_done(self.state, jnp.asarray(slots, jnp.int32))
        # a free slot follows itself: the loop copies a row's `done` from its primary row
        self._params["primary"][slots] = slots
        self._params["uncond_row"][slots] = -1
        self._free = sorted(self._free + slots)

    def _prefill_into(self, rows, slots: list[int]) -> None:
        loop = self.loop
        n_rows = _pow2(len(rows))
        padded = list(rows) + [self._dummy_rows(1)[0][0]] * (n_rows - len(rows))
        tokens, segments, cont, index, pixels, _ = _build_batch(
            padded, loop.config.vision.features_per_image if loop.config.vision else None)
        width = min(_pow2(tokens.shape[1]), self.length)
        pad = ((0, 0), (0, width - tokens.shape[1]))
        tokens, segments, cont, index = (np.pad(a, pad) for a in (tokens, segments, cont, index))
        targets = np.full(n_rows, self.n_slots, np.int32)  # padding rows go nowhere (dropped)
        targets[:len(slots)] = slots
        grid = _initial_grid(padded)
        with sharding.mesh_context(loop.mesh):
            logits, cache = loop._prefill(loop.params, tokens, segments, cont, index, pixels, self.length)
            self.state = _place(self.state, jnp.asarray(targets), logits, cache, jax.tree.map(jnp.asarray, grid))

    # --- running ---------------------------------------------------------------------------
    def step(self) -> dict[Hashable, np.ndarray]:
        """Runs one chunk of the compiled loop over every slot; returns the requests that finished
        in it (their generated ids), whose slots are free again. When the chunk fails, every
        running request leaves its slots and the error is raised: the decoder takes new ones."""
        if not self.running:
            return {}
        if self._device_params is None:
            self._device_params = RowParams(**{k: jnp.asarray(v) for k, v in self._params.items()},
                                            key=jax.vmap(jax.random.key)(jnp.asarray(self._seeds)),
                                            stop_tokens=jnp.asarray(self._stop))
        loop = self.loop
        try:
            with sharding.mesh_context(loop.mesh):
                end = self.state.step + self.chunk
                self.state = loop._run(loop.params, self.state, self._device_params, end, self.n_slots)
            done, n_out = np.asarray(self.state.done), np.asarray(self.state.n_out)  # (where a run's error shows)
        except Exception:  # every running request leaves; the slots serve new ones
            self._recover(list(self.running))
            raise
        ended = [(name, running) for name, running in self.running.items() if done[running.slots[0]]]
        if not ended:
            return {}
        out = np.asarray(self.state.out)  # one transfer for every row that ended
        filled = np.asarray(self.state.cache["index"])
        finished, freed = {}, []
        for name, running in ended:
            row = running.slots[0]
            finished[name] = out[row, :n_out[row]].copy()
            self._hold(running, finished[name], int(filled[row]))  # (a guided one's partner holds nothing to reuse)
            del self.running[name]
            freed += running.slots
        self._release(freed)
        return finished

    def run_all(self, requests: dict[Hashable, Request]) -> dict[Hashable, np.ndarray]:
        """Every request, admitted as slots free up, to the end (a convenience for tests and batch jobs)."""
        waiting = list(requests.items())
        out: dict[Hashable, np.ndarray] = {}
        while waiting or self.running:
            while waiting and self.slots_needed(waiting[0][1]) <= self.free_slots:
                self.admit(*waiting.pop(0))
            if waiting and not self.running:
                raise ValueError(f"{waiting[0][0]!r} needs more slots than there are ({self.n_slots})")
            out.update(self.step())
        return out


@functools.partial(jax.jit, donate_argnums=(0,))
def _place(state: SamplingState, slots, logits, cache, grid: GridState) -> SamplingState:
    """Writes new rows (prefilled alone) into their slots; a slot index past the end is dropped."""
    put = lambda old, new, axis=0: (old.at[(slice(None),) * axis + (slots,)].set(new.astype(old.dtype),  # noqa: E731
                                                                                  mode="drop"))

    def put_kv(old, new):  # a buffer per layer ([B, ...] each), or all layers stacked ([layers, B, ...])
        return tuple(map(put, old, new)) if isinstance(old, tuple) else put(old, new, 1)

    return state.replace(
        grid=jax.tree.map(put, state.grid, grid),
        logits=put(state.logits, logits),
        cache={"k": put_kv(state.cache["k"], cache["k"]), "v": put_kv(state.cache["v"], cache["v"]),
               "index": put(state.cache["index"], cache["index"])},
        out=put(state.out, jnp.zeros((slots.shape[0], state.out.shape[1]), state.out.dtype)),
        n_out=put(state.n_out, jnp.zeros_like(slots)),
        done=put(state.done, jnp.zeros(slots.shape, bool)))


@jax.jit
def _take_row(cache, slot, start):
    """One slot's cache ([1, ...] buffers) with its index set to `start`."""
    def take(a, axis):
        return jax.lax.dynamic_slice_in_dim(a, slot, 1, axis)

    def take_kv(buffers):  # a buffer per layer, or all layers stacked
        return tuple(take(a, 0) for a in buffers) if isinstance(buffers, tuple) else take(buffers, 1)

    return {"k": take_kv(cache["k"]), "v": take_kv(cache["v"]), "index": jnp.full((1,), start, jnp.int32)}


@functools.partial(jax.jit, donate_argnums=(0,))
def _mark_done(state: SamplingState, slots) -> SamplingState:
    return state.replace(done=state.done.at[slots].set(True),
                         grid=state.grid.replace(mode=state.grid.mode.at[slots].set(DONE)))
