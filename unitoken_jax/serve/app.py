"""The ASGI app of `unitoken serve`: OpenAI's endpoints over a `UniTokenPipeline`.

    POST /v1/chat/completions   text and pictures in (data URLs), text and pictures out; stream=true
                                sends server-sent events (chat.completion.chunk ... data: [DONE])
    POST /v1/images/generations prompt -> n pictures (b64_json); guidance_scale, negative_prompt, seed
    POST /v1/images/edits       multipart: one picture and an instruction -> n pictures
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"} (503 if the decoding worker has stopped); never needs the API key
    GET  /metrics               Prometheus text: requests, queue, rows in use, tokens/s

A handler checks and encodes its call (tokenizing, reading pictures: in a thread, beside the
running batch), hands its requests to the `Scheduler` and waits for them. A call that cannot be
queued gets 429; one that has not finished after `timeout` seconds gets 504 (dropped if it never
started); a call whose client goes away before it starts is dropped. How the wire format carries
pictures is in `wire`'s docstring. Choice i of a call (a chat's `n`, an images call's `n`) runs
with seed `seed + i`, as `UniTokenPipeline.generate_image` numbers them; without a seed the server
draws one.

A chat call may carry `guidance_scale` (an extra field, default 1 = off): classifier-free guidance
for a picture its answer draws, from the answer's own <racm3:break> on (the unconditional row waits
while the answer writes text); it takes a second row for the whole call, and starts again at each
picture's own <racm3:break>, as the reference's guidance does. The web page's drawings send the
images endpoint's default (`ServeSettings.default_guidance`, 3).

Defaults that differ from OpenAI's: `temperature` 0 (greedy, how the small models answer best;
OpenAI's is 1), and without `max_tokens` an answer may take every position the model has left.
A batch's KV cache is as long as its longest prompt plus the most tokens any of its calls asks for,
so a client whose answers are short makes the batches it joins faster by saying so.

Streaming sends each choice's role at once, then, after every chunk of decoding steps (`chunk`
or `slot_chunk` steps), a comment line (`: generated [tokens so far, each choice]`, which clients
skip and the web page draws its progress bar from) and each choice's new text (`conversation.TextStream`:
the text before the answer's first picture, settled characters only); when the call is done, the
rest of each answer: its pictures, each a chunk, and any text after them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import hmac
from importlib import resources
import json
import logging
import re
import secrets
import socket
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from unitoken_jax.inference.pipeline import NegativePromptError, NegativePromptTooLong, PictureTooLarge
from unitoken_jax.serve import metrics, wire
from unitoken_jax.serve.engine import PipelineEngine
from unitoken_jax.serve.scheduler import (ContinuousScheduler, DoesNotFit, Expired, Job, QueueFull, Scheduler,
                                         ShuttingDown)
from unitoken_jax.serve.wire import APIError, bad
from unitoken_jax.tokenizer.conversation import (ConversationError, SequenceTooLong, TextStream, stop_seen,
                                                 tokens_to_stop)

log = logging.getLogger(__name__)
KEEPALIVE_SECONDS = 5.0
# on Ctrl-C / SIGTERM: how long a running static batch may go on to its end (a picture of the release
# takes many seconds; uvicorn cuts what is left after it), and how long before that its calls are
# answered 503 `shutting_down` instead (under the 30 s a Kubernetes pod is given by default)
GRACEFUL_SHUTDOWN_SECONDS, TELL_BEFORE_SECONDS = 25.0, 1.0
CLIENT_GONE = 499  # nginx's "client closed request": what the metrics count a dropped call as


@dataclasses.dataclass
class ServeSettings:
    model_name: str = "unitoken"
    api_key: str | None = None  # every endpoint but /health then needs "Authorization: Bearer KEY"
    max_batch: int = 16  # rows of one batch, padding included (a guided picture takes two)
    queue_limit: int = 64  # calls waiting; one more gets 429
    timeout: float = 600.0  # seconds a call may take, queue included; then 504
    batch_wait: float = 0.0  # seconds without a new call before the worker starts a batch (0: at once)
    max_body_bytes: int = 32 * 1024 * 1024  # a larger body gets 413 (pictures travel in the body)
    limits: wire.Limits = dataclasses.field(default_factory=wire.Limits)
    default_size: tuple[int, int] = (512, 512)  # size "auto" (or none given)
    sizes: tuple[tuple[int, int], ...] | None = None  # the only sizes drawn; None: any the model fits
    default_guidance: float = 3.0
    chunk: int = 64  # decoding steps between the decode loop's returns to the host (static batching)
    # "static": a batch runs to its end (`Scheduler`); "continuous": rows join and leave the running
    # rows between chunks of `slot_chunk` steps (`ContinuousScheduler`, max_batch slots)
    batching: str = "static"
    slot_chunk: int = 16
    slot_length: int | None = None  # positions a slot holds (prompt + answer); None: all the model has
    # origins whose web pages may call the API from a browser (CORS; "*": any); none: only this
    # server's own page, which needs none
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self):
        self.validate()  # as they are made; the server checks them again with its model's positions

    def validate(self, positions: int | None = None) -> None:
        """Refuses settings the server cannot run with, by name; `positions`: the model's (bounds
        `slot_length` from above)."""
        if self.batching not in ("continuous", "static"):
            raise ValueError(f"batching={self.batching!r}; choose 'continuous' or 'static'")
        # (NaN fails each comparison: refused too)
        for name, ok, what in (("max_batch", lambda v: v >= 1, "at least 1"),
                               ("queue_limit", lambda v: v >= 1, "at least 1"),
                               ("timeout", lambda v: v > 0, "positive"),
                               ("max_body_bytes", lambda v: v > 0, "positive"),
                               ("batch_wait", lambda v: v >= 0, "0 or more")):
            if not ok(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be {what}")
        key = self.api_key
        if key and (key != key.strip() or not key.isascii() or not key.isprintable()):  # (the key is not echoed)
            raise ValueError("api_key: a key with spaces at either end, or characters other than printable ASCII, "
                             "could never match the 'Authorization: Bearer KEY' header clients send")
        bad_origins = [o for o in self.cors_origins if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o)]
        if bad_origins:  # (a browser sends its page's origin as scheme://host[:port], no path)
            raise ValueError(f"cors_origins {bad_origins}: an origin is scheme://host[:port] with no path, e.g. "
                             "http://localhost:3000, or '*' for any")
        if min(self.chunk, self.slot_chunk) < 1:
            raise ValueError(f"chunk={self.chunk}, slot_chunk={self.slot_chunk}: each must be at least 1 step")
        if self.slot_length is not None and not 2 <= self.slot_length <= (positions or self.slot_length):
            most = f"the model's {positions}" if positions is not None else "the model's"
            raise ValueError(f"slot_length={self.slot_length}: a slot holds 2 to {most} positions (prompt and answer)")


class _Ticket:
    """A job's results, handed from the worker's thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.result: asyncio.Future = loop.create_future()
        self.progress: asyncio.Queue = asyncio.Queue()

    def _call(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            self.loop.call_soon_threadsafe(fn, *args)

    def finish(self, outcome) -> None:
        self._call(lambda: self.result.done() or self.result.set_result(outcome))

    def report(self, ids) -> None:
        self._call(self.progress.put_nowait, ids)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        # a large body (pictures in data URLs) is parsed beside the event loop, which keeps serving
        body = json.loads(raw) if len(raw) < 65536 else await run_in_threadpool(json.loads, raw)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's stack
        raise bad(f"the body is not valid JSON ({type(e).__name__}: {e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Server:
    """The endpoints' shared state: the pipeline, the scheduler and the counters."""

    def __init__(self, pipe, settings: ServeSettings, engine=None):
        self.pipe, self.settings = pipe, settings
        self.engine = engine or PipelineEngine(pipe, max_rows=settings.max_batch, chunk=settings.chunk)
        positions = pipe.model.config.decoder.max_position_embeddings if engine is None else None
        settings.validate(positions)
        if settings.batching == "continuous" and engine is None:
            length = settings.slot_length or positions
            self.scheduler = ContinuousScheduler(self.engine, slots=settings.max_batch, length=length,
                                                 queue_limit=settings.queue_limit, chunk=settings.slot_chunk)
        else:
            self.scheduler = Scheduler(self.engine, max_rows=settings.max_batch,
                                       queue_limit=settings.queue_limit, batch_wait=settings.batch_wait)
        self.requests = metrics.RequestCounter()
        self.created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.scheduler.stop)

    # --- queueing and waiting -----------------------------------------------------------------------
    def _submit(self, requests, *, stream: bool = False, stop: list[str] | None = None,
                picture: bool = False) -> tuple[Job, _Ticket]:
        """`picture`: an image call (what a call too long for a slot names: its prompt or its size)."""
        ticket = _Ticket(asyncio.get_running_loop())
        ended = None
        if stop:  # generation ends at a stop string (after the chunk that shows it), not at its own end
            tokenizer = self.pipe.tokenizer
            ended = lambda ids: [stop_seen(x, tokenizer, stop, starts_in_picture=r.starts_in_picture)  # noqa: E731
                                 for x, r in zip(ids, requests)]
        job = Job(requests, on_finish=ticket.finish, on_progress=ticket.report if stream else None, ended=ended,
                  deadline=time.monotonic() + self.settings.timeout)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except DoesNotFit as e:  # (a continuous server's --slot-length; a chat's was named before submitting)
            slot = getattr(self.scheduler, "length", self.pipe.max_length)
            field = ("prompt" if max(r.longest_prompt for r in requests) >= slot else "size") if picture else None
            raise bad(str(e), field, "context_length_exceeded") from None
        except ShuttingDown as e:
            self._outcome(e)
        except ValueError as e:  # more rows than --max-batch: guidance's second rows, where one a choice would fit
            guided = any(r.cfg_scale != 1.0 for r in requests)
            field = "guidance_scale" if guided and len(requests) <= self.scheduler.max_rows else "n"
            raise bad(str(e), field, "exceeds_max_batch") from None
        return job, ticket

    def _timeout_error(self) -> APIError:
        return APIError(504, f"the call did not finish within the server's timeout of {self.settings.timeout:g} s",
                        type="timeout_error", code="timeout")

    def _outcome(self, outcome) -> list:
        if isinstance(outcome, ShuttingDown):
            raise APIError(503, f"{outcome}: the call was stopped before it finished; retry on another server or "
                           "later", type="server_error", code="shutting_down")
        if isinstance(outcome, Expired):
            raise self._timeout_error()
        if isinstance(outcome, BaseException):
            raise APIError(500, f"the batch failed: {type(outcome).__name__}: {outcome}", type="server_error")
        return outcome

    async def _wait(self, request: Request, job: Job, ticket: _Ticket) -> list | None:
        """The job's outputs; None if the client went away (the job is dropped if it had not started)."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({ticket.result, gone}, timeout=job.deadline - time.monotonic(),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if ticket.result in done:
            return self._outcome(ticket.result.result())
        self.scheduler.cancel(job)
        if gone in done:
            return None
        raise self._timeout_error()

    # --- endpoints -------------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        """The web page: chat with picture upload, drawing with a progress bar, a gallery. Plain
        HTML and JavaScript calling this server's API (the API key, if one is set, is typed into
        the page); the page itself needs no key."""
        html = (resources.files("unitoken_jax.serve") / "static" / "index.html").read_text(encoding="utf-8")
        html = html.replace("__GUIDANCE__", json.dumps(self.settings.default_guidance))
        html = html.replace("__MAX_PICTURE_BYTES__", json.dumps(self.settings.limits.max_image_bytes))
        # the prompt the model was trained to draw from, filled in here at the page's size as str.format
        # fills it (doubled braces, format specs), the typed prompt to go between its parts; "</"
        # escaped, so no template can end the page's script
        marker = f"PROMPT{uuid.uuid4().hex}"
        w, h = self.settings.default_size
        parts = self.pipe.generate_template.format(w=w, h=h, prompt=marker).split(marker)
        html = html.replace("__TEMPLATE__", json.dumps(parts).replace("</", "<\\/"))
        return HTMLResponse(html.replace("__SIZE__", json.dumps(list(self.settings.default_size))))

    async def health(self, request: Request) -> Response:
        if not self.scheduler.alive:  # (a load balancer then takes this server out)
            return JSONResponse({"status": "the decoding worker has stopped; see the server's log"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        text = metrics.render(self.requests, self.scheduler, len(self.engine.shapes_seen))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [wire.model_card(self.settings.model_name, self.created)]})

    async def model(self, request: Request) -> Response:
        wire.check_model({"model": request.path_params["model"]}, self.settings.model_name)
        return JSONResponse(wire.model_card(self.settings.model_name, self.created))

    def _chat_request(self, call: wire.ChatCall):
        try:
            request = self.pipe.chat_request(call.conversation, call.images, max_new_tokens=1, seed=0,
                                             temperature=call.temperature, top_p=call.top_p, top_k=call.top_k,
                                             cfg=call.guidance_scale, allow_images=call.allow_images)
        except ConversationError as e:
            raise bad(str(e), "messages", "context_length_exceeded" if isinstance(e, SequenceTooLong) else None) \
                from None
        except ValueError as e:  # the request's own checks (sampling ranges): the caller's, not a server fault
            raise bad(str(e)) from None
        # a continuous server's calls each have a slot (--slot-length) of the model's positions
        length = getattr(self.scheduler, "length", self.pipe.max_length)
        whose = "the model's" if length == self.pipe.max_length else "this server's (--slot-length)"
        prompt = len(request.tokens)
        room = length - prompt
        if room < 1:  # the messages alone: whatever max_tokens says, they are what to shorten
            raise bad(f"the conversation takes {prompt} positions, more than {whose} {length} leave room for an "
                      "answer in", "messages", "context_length_exceeded")
        if (call.max_tokens or 0) > room:
            raise bad(f"{call.length_field}={call.max_tokens} does not fit: the conversation takes {prompt} of "
                      f"{whose} {length} positions, leaving {room} for the answer", call.length_field,
                      "context_length_exceeded")
        return dataclasses.replace(request, max_new_tokens=call.max_tokens or room)

    def _generated(self, prompt, outputs, stop: list[str]) -> int:
        """The answers' tokens up to where each stopped (the tokens of the chunk a stop string
        was seen in that came after it are not the caller's)."""
        return sum(tokens_to_stop(o.ids, self.pipe.tokenizer, stop, starts_in_picture=prompt.starts_in_picture)
                   for o in outputs)

    @staticmethod
    def _seeds(seed: int | None, n: int) -> list[int]:
        first = secrets.randbelow(wire.SEED_LIMIT) if seed is None else seed
        return [(first + i) % wire.SEED_LIMIT for i in range(n)]

    async def chat_completions(self, request: Request) -> Response:
        body = await _json_body(request)
        call = await run_in_threadpool(wire.parse_chat, body, self.settings.model_name, self.settings.limits)
        prompt = await run_in_threadpool(self._chat_request, call)
        requests = [dataclasses.replace(prompt, seed=s) for s in self._seeds(call.seed, call.n)]
        job, ticket = self._submit(requests, stream=call.stream, stop=call.stop)
        if call.stream:
            return StreamingResponse(self._chat_stream(call, job, ticket, len(prompt.tokens)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        outputs = await self._wait(request, job, ticket)
        if outputs is None:
            return Response(status_code=CLIENT_GONE)
        choices = []
        for out in outputs:
            parts, stopped = wire.apply_stop(out.parts, call.stop)
            choices.append((parts, "stop" if stopped else out.finish_reason))
        usage = wire.usage(len(prompt.tokens), await run_in_threadpool(self._generated, prompt, outputs, call.stop))
        content = await run_in_threadpool(wire.chat_completion, wire.completion_id(), self.settings.model_name,
                                          choices, usage)
        return JSONResponse(content)

    async def _chat_stream(self, call: wire.ChatCall, job: Job, ticket: _Ticket, prompt_tokens: int):
        """The events of a streamed chat completion. If the client goes away, Starlette cancels
        this generator and `finally` drops the job (if it has not started)."""
        call_id, created, model = wire.completion_id(), int(time.time()), self.settings.model_name
        starts_in_picture = job.requests[0].starts_in_picture
        texts = [TextStream(self.pipe.tokenizer, call.stop, starts_in_picture=starts_in_picture)
                 for _ in range(call.n)]
        chunk = functools.partial(wire.chat_chunk, call_id, model, created, include_usage=call.include_usage)
        try:
            for i in range(call.n):
                yield _sse(chunk(i, {"role": "assistant", "content": ""}))
            while not ticket.result.done():
                left = job.deadline - time.monotonic()
                if left <= 0:
                    self.scheduler.cancel(job)
                    yield _sse(self._timeout_error().body())
                    return
                report = asyncio.ensure_future(ticket.progress.get())
                try:
                    done, _ = await asyncio.wait({ticket.result, report}, timeout=min(KEEPALIVE_SECONDS, left),
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:  # (its client gone, this generator is cancelled here: a pending task left behind
                    if not report.done():  # was logged as "Task was destroyed but it is pending!")
                        report.cancel()
                if report in done:
                    ids = report.result()
                    yield f": generated {[len(x) for x in ids]}\n\n"
                    for i, (text, x) in enumerate(zip(texts, ids)):
                        if delta := await run_in_threadpool(text.update, x):
                            yield _sse(chunk(i, {"content": delta}))
                elif not done:
                    yield ": waiting\n\n"  # keeps proxies from closing an idle stream
            try:
                outputs = self._outcome(ticket.result.result())
            except APIError as e:
                yield _sse(e.body())
                return
            for i, out in enumerate(outputs):
                parts, stopped = wire.apply_stop(out.parts, call.stop)
                for delta in await run_in_threadpool(wire.chunk_deltas, texts[i].rest(parts)):
                    yield _sse(chunk(i, delta))
                yield _sse(chunk(i, {}, finish_reason="stop" if stopped else out.finish_reason))
            if call.include_usage:
                generated = await run_in_threadpool(self._generated, job.requests[0], outputs, call.stop)
                usage = wire.usage(prompt_tokens, generated)
                yield _sse(chunk(None, usage=usage))
            yield "data: [DONE]\n\n"
        finally:
            if not ticket.result.done():
                self.scheduler.cancel(job)

    def _image_requests(self, call: wire.ImageCall, picture=None) -> list:
        options = dict(size=call.size, cfg=call.guidance_scale, negative_prompt=call.negative_prompt, seed=0)
        try:
            if picture is None:
                base = self.pipe.generate_request(call.prompt, **options)
            else:
                base = self.pipe.edit_request(picture, call.prompt, **options)
        except NegativePromptTooLong as e:  # too long for the model, or for the picture beside it
            raise bad(str(e), "negative_prompt", "context_length_exceeded") from None
        except NegativePromptError as e:  # not plain text
            raise bad(str(e), "negative_prompt") from None
        except PictureTooLarge as e:  # (a smaller size fits beside this prompt: the size's fault)
            raise bad(str(e), "size", "context_length_exceeded") from None
        except ConversationError as e:  # the prompt itself (too long with its picture, not plain text)
            raise bad(str(e), "prompt", "context_length_exceeded" if isinstance(e, SequenceTooLong) else None) \
                from None
        except ValueError as e:  # the pipeline's size checks: a multiple of 32 px, room in the model
            raise bad(str(e), "size", "invalid_size") from None
        return [dataclasses.replace(base, seed=s) for s in self._seeds(call.seed, call.n)]

    async def _draw(self, request: Request, call: wire.ImageCall, picture=None) -> Response:
        requests = await run_in_threadpool(self._image_requests, call, picture)
        job, ticket = self._submit(requests, picture=True)
        outputs = await self._wait(request, job, ticket)
        if outputs is None:
            return Response(status_code=CLIENT_GONE)
        pictures = [next((p for p in o.parts if not isinstance(p, str)), None) for o in outputs]
        if any(p is None for p in pictures):
            raise APIError(500, "the model ended without a picture", type="server_error")
        return JSONResponse(await run_in_threadpool(wire.images_response, pictures, call.output_format, call.size))

    def _parse_images(self, fields: dict) -> wire.ImageCall:
        s = self.settings
        return wire.parse_images(fields, s.model_name, s.limits, default_size=s.default_size, sizes=s.sizes,
                                 default_guidance=s.default_guidance)

    async def images_generations(self, request: Request) -> Response:
        return await self._draw(request, self._parse_images(await _json_body(request)))

    async def images_edits(self, request: Request) -> Response:
        limits = self.settings.limits
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":  # (a JSON body read as an empty form: "got 0 pictures")
            sent = kind or "a body without a content type"
            raise bad(f"this endpoint takes a multipart form (the picture as its 'image' file part), not {sent}",
                      code="invalid_form")
        try:
            body = await request.body()  # (kept: the form is parsed from it, and its text checked against it)
            form = await request.form(max_files=4, max_fields=32)
        except APIError:
            raise
        except Exception as e:  # python-multipart's and Starlette's errors on a malformed form
            raise bad(f"the body is not a valid multipart form ({e})", code="invalid_form") from None
        if "mask" in form:
            raise bad("masks are not supported: the instruction says what to change", "mask", "unsupported_parameter")
        uploads = form.getlist("image") + form.getlist("image[]")
        if len(uploads) != 1:
            raise bad(f"send exactly one picture as the form's 'image' file (got {len(uploads)})", "image")
        if not isinstance(uploads[0], UploadFile):
            raise bad("'image' must be a file part of the form, not a text field", "image")
        raw = await uploads[0].read(limits.max_image_bytes + 1)
        picture = await run_in_threadpool(wire.read_picture, raw, "image", limits)
        items = [(k, v) for k, v in form.multi_items() if k not in ("image", "image[]")]
        twice = sorted(k for k, n in collections.Counter(k for k, _ in items).items() if n > 1)
        if twice:  # (the last one was used, silently)
            raise bad(f"the form gives {twice[0]!r} more than once", twice[0])
        fields = dict(items)
        files = [k for k, v in fields.items() if not isinstance(v, str)]
        if files:  # (named: a `markup` file was refused as if the picture were wrong)
            raise bad(f"only 'image' may be a file part of the form, not {files[0]!r}", files[0],
                      "unsupported_parameter")
        if "charset=" not in request.headers.get("content-type", "").lower():  # (UTF-8, the form's default)
            # Starlette reads a field that is not UTF-8 as Latin-1, unsaid: a GBK prompt drew from its mojibake.
            # A field read as UTF-8 is in the body as it is; one read as Latin-1 is not
            for name, value in fields.items():
                if not value.isascii() and value.encode("utf-8") not in body:
                    raise bad(f"the form's {name!r} is not UTF-8 text: send it as UTF-8", name, "invalid_form")
        return await self._draw(request, self._parse_images(wire.form_fields(fields)), picture)


class _Guard:
    """Outermost layer of the app: counts every answer by endpoint and status, checks the API key
    (all endpoints but /health), and keeps bodies under `max_body_bytes` (a declared length over it
    is refused before a byte is read; a chunked body is cut off when it passes it)."""

    def __init__(self, app, *, settings: ServeSettings, counter: metrics.RequestCounter):
        self.app, self.settings, self.counter = app, settings, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if nothing is sent, Starlette's outermost layer answers 500

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._check(scope)
            if refusal is not None:
                await _error_response(refusal)(scope, receive, counted_send)
            else:
                await self.app(scope, self._limited(receive), counted_send)
        finally:
            self.counter.add(scope["path"], status)

    def _check(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        key = self.settings.api_key
        if key and scope["path"] not in ("/health", "/"):  # the page holds no data; its calls send the key
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return APIError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(401, "Incorrect API key provided", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"")  # the HTTP layer has checked it is a number
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return self._too_large(length.decode("latin-1"))
        return None

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the body is {size} bytes; this server takes at most {self.settings.max_body_bytes}",
                        code="request_too_large", headers={"Connection": "close"})

    def _limited(self, receive):
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.settings.max_body_bytes:
                    raise self._too_large(f"more than {self.settings.max_body_bytes}")
            return message

        return limited_receive


class _Cors(CORSMiddleware):
    """Starlette's CORS middleware with its refused preflight (another origin, a method) said in
    OpenAI's error JSON, as every other refusal is (it was plain text)."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        return _error_response(APIError(response.status_code, f"CORS preflight refused: {refused} (the server's "
                                        "--cors-origin names the pages that may call it)", code="cors_refused",
                                        headers=headers))


def _error_response(error: APIError) -> Response:
    # ASCII JSON: a message that echoes the caller's text (a model's name, a field's) may hold a lone
    # surrogate, which JSON escapes but UTF-8 cannot encode
    return Response(json.dumps(error.body()), status_code=error.status, headers=error.headers,
                    media_type="application/json")


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error format."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error_response(APIError(exc.status_code, message, code=code, headers=exc.headers))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def create_app(pipe, settings: ServeSettings | None = None, *, engine=None) -> Starlette:
    """The server's ASGI app for `pipe` (a `UniTokenPipeline`); `app.state.server` holds its
    scheduler and counters. The worker thread starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    server = _Server(pipe, settings, engine)
    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/images/generations", server.images_generations, methods=["POST"]),
        Route("/v1/images/edits", server.images_edits, methods=["POST"]),
    ]
    middleware = [Middleware(_Guard, settings=settings, counter=server.requests)]
    if settings.cors_origins:  # outside the guard: a browser's preflight carries no key
        # any request header a page asks for: the official SDKs send their own (OpenAI's JavaScript
        # client, X-Stainless-*), which a list of two refused, so no call of theirs was ever made
        middleware.insert(0, Middleware(_Cors, allow_origins=list(settings.cors_origins),
                                        allow_methods=["GET", "POST"], allow_headers=["*"]))
    app = Starlette(routes=routes, lifespan=server.lifespan, middleware=middleware,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.server = server
    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` for `run` to listen on, or a ValueError saying why not (a port
    in use, a host that is not this machine's): bound before a model loads, the server neither
    loads it in vain nor says it serves where it cannot."""
    # asyncio takes a port past 65535 modulo 65536 (99999 listened on 34463 while the log said 99999)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be a whole number in [1, 65535], got {port!r}")
    # as uvicorn binds (`Config.bind_socket`): IPv6 only for a host with a colon, so `localhost` is 127.0.0.1
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise ValueError(f"--host {host}: no address of that name ({e.strerror})") from None
    except OSError as e:
        sock.close()
        hint = "; another program listens there: give another --port" if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}){hint}") from None
    sock.set_inheritable(True)
    return sock


def run(pipe, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        sock: socket.socket | None = None) -> None:
    """Serves until interrupted (Ctrl-C), on `sock` (`bind(host, port)`'s; made here if None)."""
    import uvicorn

    sock = bind(host, port) if sock is None else sock
    if not settings.api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(--api-key or $UNITOKEN_API_KEY)", host)
    app = create_app(pipe, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    with sock:
        server_class(uvicorn)(config, app).run(sockets=[sock])


def server_class(uvicorn):
    """uvicorn's `Server`, told to stop the app's scheduler before it closes its connections.
    uvicorn's own order (connections, then the app's lifespan) left the calls waiting in the queue
    to be cut after its graceful timeout (a plain 500, a stream ended mid-way); stopped first, the
    scheduler answers each of them 503 `shutting_down` while its connection is still open, and a
    running batch goes on to its end within that timeout."""

    class Server(uvicorn.Server):
        def __init__(self, config, app):
            super().__init__(config)
            self.app_scheduler = app.state.server.scheduler

        async def shutdown(self, sockets=None):
            await run_in_threadpool(self.app_scheduler.stop, 0.0)
            graceful, told = self.config.timeout_graceful_shutdown, None
            if graceful is not None:
                # a static batch still running then is answered 503 before uvicorn cuts its
                # connections (a plain-text 500, a stream ended mid-way)
                told = asyncio.get_running_loop().call_later(max(graceful - TELL_BEFORE_SECONDS, 0.0),
                                                             self.app_scheduler.tell_running)
            try:
                await super().shutdown(sockets)
            finally:
                if told is not None:
                    told.cancel()

    return Server
