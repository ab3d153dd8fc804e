"""One batch of requests through the pipeline's compiled decode loop, at a few fixed shapes.

`DecodeLoop.generate` compiles its prefill and loop for each new batch shape: rows, requests,
prompt length, new tokens and input pictures. On this CPU a compile of the
bundled model takes 3-6 s and a batch runs in 15-200 ms, so a server that ran every batch at its
own shape would spend its time compiling. `PipelineEngine` pads each batch to bucketed sizes, so
that batches of any mix meet a bounded set of shapes, each compiled once:

- rows and guided pictures to powers of two, with dummy requests (a guided dummy brings its
  unconditional partner row, as a guided picture does);
- the longest prompt to a power of two, with a dummy whose prompt is that long, and the input
  pictures to a power of two, carried by a dummy that uses none of them;
- new tokens to a power of two: the request that asks for the most runs that long and its
  answer is cut back to what it asked for (a row's tokens do not depend on how long it runs).

Sampling options are not part of the shape: every row keeps its own top-k, top-p and temperature
as arrays (`inference.sampling` finds each row's kept set by threshold, not by a top-k of a
compiled size).

Every dummy asks for one token. Padding never changes which tokens a request samples (each row
has its own key, parameters and state; the decode loop's docstrings say how) but it changes the
shapes the floats are computed at, which can move a last bit; `tests/test_serve.py` compares
batched answers with answers run alone. Where padding would pass `max_rows`, the dimension is left
unpadded (one more compile, never a bigger batch than asked).

The price: a dummy row is computed at every step like a real one. On this CPU a batch of 8
questions and 8 guided pictures, padded from 25 rows (with its filler) to 32, decoded in about
1.45x the time of the same batch unpadded (0.17 s against 0.11 s); a compile saved is worth many
such batches. The continuous-batching loop (fixed slots, no per-batch shapes) removes both costs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

from unitoken_jax.inference.decode import Request
from unitoken_jax.tokenizer import layout
from unitoken_jax.tokenizer.conversation import decode, ended

log = logging.getLogger(__name__)

MIN_BUCKET = 32


@dataclasses.dataclass
class Output:
    ids: np.ndarray  # the request's generated ids, cut to its max_new_tokens
    parts: list  # [text, picture, ...] as the pipeline decodes them
    finish_reason: str  # "stop": the answer ended (end of turn, or its picture's <eoss>); "length": cut


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """What a padded batch compiles for."""

    requests: int
    rows: int
    prompt: int
    new_tokens: int
    pictures: int


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rows_of(r: Request) -> int:
    return 2 if r.cfg_scale != 1.0 else 1


def shape_of(requests: Sequence[Request]) -> BatchShape:
    """The shape `DecodeLoop.generate` compiles these requests at."""
    lengths = [len(r.tokens) for r in requests] + [len(r.uncond_tokens) for r in requests if _rows_of(r) == 2]
    return BatchShape(requests=len(requests), rows=sum(_rows_of(r) for r in requests), prompt=max(lengths),
                      new_tokens=max(r.max_new_tokens for r in requests),
                      pictures=sum(len(r.pixels) for r in requests if r.pixels is not None))


class PipelineEngine:
    """Runs batches of `Request`s through `pipe.decode_loop` at bucketed shapes (module docstring)
    and decodes each answer as `UniTokenPipeline.run` does. Used from one thread at a time."""

    def __init__(self, pipe, *, max_rows: int, chunk: int = 64):
        self.pipe, self.max_rows, self.chunk = pipe, max_rows, chunk
        self.shapes_seen: set[BatchShape] = set()

    # --- padding ----------------------------------------------------------------------------------
    def _dummy(self, length: int = 1, *, guided: bool = False, pictures: np.ndarray | None = None) -> Request:
        """A greedy request that asks for one token, with `length` tokens of prompt and its own
        `pictures` (used by none of its positions), to make the batch's shape."""
        bos = self.pipe.tokenizer.bos_id
        extra = {}
        if pictures is not None and len(pictures):
            extra = dict(pixels=pictures, is_continuous=np.zeros(length, bool),
                         feature_index=np.zeros(length, np.int32))
        if guided:
            extra.update(cfg_scale=2.0, uncond_tokens=np.array([bos], np.int32))
        return Request(tokens=np.full(length, bos, np.int32), max_new_tokens=1, image_temperature=0.0, **extra)

    def pad(self, requests: Sequence[Request]) -> list[Request]:
        """`requests` (kept first, in order) and the dummies that bring the batch to its bucket."""
        requests = list(requests)
        have = shape_of(requests)
        guided = have.rows - have.requests
        want_guided = _pow2(guided) if guided else 0
        # (a dummy's prompt leaves the model a position to answer in: `DecodeLoop` refuses one that does not)
        want_prompt = min(max(MIN_BUCKET, _pow2(have.prompt)),
                          max(have.prompt, self.pipe.decode_loop.config.decoder.max_position_embeddings - 1))
        want_pictures = _pow2(have.pictures) if have.pictures else 0
        rows = have.rows + 2 * (want_guided - guided)
        if rows > self.max_rows:
            want_guided, rows = guided, have.rows
        filler = (want_prompt, want_pictures) != (have.prompt, have.pictures)
        needs_own_row = filler and want_guided == guided
        if rows + needs_own_row > self.max_rows:
            filler = needs_own_row = False
        rows += needs_own_row
        want_rows = max(rows, min(_pow2(rows), self.max_rows))

        # the longest request runs to the bucket; its answer is cut back in `run`
        longest = max(range(len(requests)), key=lambda i: requests[i].max_new_tokens)
        want_new = max(MIN_BUCKET, _pow2(have.new_tokens))
        requests[longest] = dataclasses.replace(requests[longest], max_new_tokens=want_new)

        dummies = [self._dummy(guided=True) for _ in range(want_guided - guided)]
        dummies += [self._dummy() for _ in range(want_rows - rows)]
        if needs_own_row:
            dummies.append(self._dummy())
        if filler:
            spare = want_pictures - have.pictures
            template = next(r.pixels for r in requests if r.pixels is not None and len(r.pixels)) if spare else None
            blank = np.zeros((spare, *template.shape[1:]), template.dtype) if spare else None
            dummies[0] = self._dummy(want_prompt, guided=dummies[0].cfg_scale != 1.0, pictures=blank)
        return requests + dummies

    def rows(self, requests: Sequence[Request]) -> int:
        """Rows the batch takes once padded (what `max_rows` bounds)."""
        return shape_of(self.pad(requests)).rows

    # --- running ----------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request],
            progress: Callable[[list[np.ndarray]], Sequence[int] | None] | None = None) -> list[Output]:
        """Generates `requests` as one batch; `progress(ids)` gets the ids each request has
        generated so far (cut to its max_new_tokens), after every chunk of decoding steps, and may
        return the indices of requests to end there (`DecodeLoop.generate`). An answer that cannot
        be read back is its exception in the list."""
        padded = self.pad(requests)
        self.shapes_seen.add(shape_of(padded))
        n = len(requests)

        def callback(info):
            return progress([info["out"][i, :min(info["n_out"][i], r.max_new_tokens)]
                             for i, r in enumerate(requests)])
        generation = self.pipe.decode_loop.generate(padded, chunk=self.chunk,
                                                    progress=None if progress is None else callback)
        outputs: list[Output | Exception] = []
        for r, ids in zip(requests, generation.tokens[:n]):
            try:
                outputs.append(self._output(r, ids))
            except Exception as e:  # that request's call fails, not the batch's others (`Scheduler._run`)
                log.exception("reading an answer back failed")
                outputs.append(e)
        return outputs

    def _output(self, request: Request, ids: np.ndarray) -> Output:
        cut = len(ids) > request.max_new_tokens
        ids = np.asarray(ids[:request.max_new_tokens])
        finished = ended(ids, stop_after_image=request.stop_after_image)
        full = np.concatenate([[layout.IMAGE_START], ids]) if request.starts_in_picture else ids
        # a chat's picture that max_tokens cut off is completed, as UniTokenPipeline.chat does
        parts = decode(full, self.pipe.tokenizer, self.pipe.vq, repair=request.allow_images,
                       unfinished=not finished or cut)
        return Output(ids=ids, parts=parts, finish_reason="stop" if finished and not cut else "length")
