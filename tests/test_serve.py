"""`unitoken serve` against the official `openai` client: the real server (uvicorn, the bundled
shapes-world model) on a free localhost port in a thread of this process.

What is proven: the model's answers arrive right through the wire format (a question about a
picture, a streamed answer equal to the plain one, pictures the pixel checker reads as asked,
from images.generate and from a chat); 16 concurrent clients each get what the same request gets
run alone through the pipeline (how much sooner they are answered than one after another is
benchmarks/serve.py's to measure, not a test's); bad requests
get OpenAI's error JSON with the right status and the server goes on; the API key guards every
endpoint but /health. A second server, whose engine is held by a gate instead of a model, makes
the queue's refusals, timeouts and cancellations happen on cue.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
requests_http = pytest.importorskip("requests")

from unitoken_jax.serve import ServeSettings, create_app  # noqa: E402
from unitoken_jax.serve import app as app_module  # noqa: E402
from unitoken_jax.serve.app import server_class  # noqa: E402
from unitoken_jax.serve.engine import Output, PipelineEngine, shape_of  # noqa: E402
from unitoken_jax.serve.scheduler import ContinuousScheduler, Job, Scheduler, ShuttingDown  # noqa: E402
from unitoken_jax.serve.wire import Limits, apply_stop, parse_chat, read_data_url  # noqa: E402
from unitoken_jax.tokenizer.conversation import TextStream, decode  # noqa: E402
from unitoken_jax.tokenizer import layout  # noqa: E402
from unitoken_jax.world import default, shapes  # noqa: E402
from unitoken_jax.world.shapes import Thing  # noqa: E402

pytestmark = pytest.mark.skipif(not default.available(), reason="no bundled model in this install")

KEY = "test-key-17"
MODEL = "unitoken-shapes"
PAGE = "http://localhost:3000"  # a web page's origin the server lets call it (CORS)
SIZE = "64x64"


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(picture: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(picture)).decode()


def _question(picture, text):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(picture)}},
                                         {"type": "text", "text": text}]}]


def _picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


class _Running:
    """A uvicorn server for `app` on a free port of 127.0.0.1, in a thread."""

    def __init__(self, app, graceful: float | None = None):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = server_class(uvicorn)(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                           timeout_graceful_shutdown=graceful), app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def scheduler(self):
        return self.app.state.server.scheduler

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def pipe():
    return default.pipeline()


@pytest.fixture(scope="module")
def server(pipe):
    settings = ServeSettings(model_name=MODEL, api_key=KEY, max_batch=32, batch_wait=0.03, default_size=(64, 64),
                             sizes=((64, 64),), max_body_bytes=16 * 1024 * 1024, limits=Limits(max_n=8),
                             cors_origins=(PAGE,))
    running = _Running(create_app(pipe, settings))
    yield running
    running.stop()


def _metric(server, name: str) -> float:
    text = requests_http.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# --- answers through the wire format ---------------------------------------------------------------
def test_chat_answers_a_question_about_a_picture(server):
    picture = shapes.draw([Thing("red", "circle", "top left")])
    answer = server.client().chat.completions.create(model=MODEL, messages=_question(picture, "What colour is the "
                                                                                           "shape?"), seed=0)
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].message.content == "red"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 16 and answer.usage.completion_tokens >= 1  # 16 features of the picture


def test_a_streamed_answer_is_the_plain_answer_in_chunks(server):
    picture = shapes.draw([Thing("blue", "triangle", "bottom left")])
    messages = _question(picture, "Describe the picture.")
    client = server.client()
    plain = client.chat.completions.create(model=MODEL, messages=messages, seed=7)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, seed=7, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == plain.choices[0].message.content == "a blue triangle at the bottom left"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # the raw events: server-sent events ending with data: [DONE]
    raw = requests_http.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": MODEL, "messages": messages, "seed": 7, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 4


def _stream_events(server, messages, **extra):
    """A streamed chat's content deltas, in order, as (kind, content): "text" before the finish
    chunk, "end" for the finish chunk."""
    events = []
    for chunk in server.client().chat.completions.create(model=MODEL, messages=messages, stream=True, **extra):
        for choice in chunk.choices:
            if choice.delta.content:
                events.append(("text", choice.delta.content))
            if choice.finish_reason:
                events.append(("end", choice.finish_reason))
    return events


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_text_streams_while_it_is_generated(pipe, batching):
    """With a chunk of 2 decoding steps, an answer of ~10 tokens arrives in several deltas before
    its end, and they make up the answer; with a stop string, nothing past it is ever sent."""
    settings = ServeSettings(model_name=MODEL, api_key=KEY, max_batch=8, default_size=(64, 64), sizes=((64, 64),),
                             chunk=2, slot_chunk=2, batching=batching)
    server = _Running(create_app(pipe, settings))
    try:
        messages = _question(shapes.draw([Thing("blue", "triangle", "bottom left")]), "Describe the picture.")
        events = _stream_events(server, messages, seed=7)
        texts = [c for kind, c in events if kind == "text"]
        assert events[-1] == ("end", "stop") and len(texts) >= 3, events
        assert "".join(texts) == "a blue triangle at the bottom left"
        events = _stream_events(server, messages, seed=7, stop=["triangle"])
        assert "".join(c for kind, c in events if kind == "text") == "a blue "
        assert events[-1] == ("end", "stop")

        # a stop string ends generation (after the chunk of 2 steps it shows in), and the usage counts
        # the tokens until it was complete: the same count the plain tokenizer gives on the full answer
        client = server.client()
        whole = client.chat.completions.create(model=MODEL, messages=messages, seed=7)
        ids = pipe.tokenizer.encode_text(whole.choices[0].message.content)
        assert pipe.tokenizer.decode_text(ids) == "a blue triangle at the bottom left"
        until_blue = next(k for k in range(1, len(ids) + 1) if "blue" in pipe.tokenizer.decode_text(ids[:k]))
        before = server.scheduler.generated_tokens
        stopped = client.chat.completions.create(model=MODEL, messages=messages, seed=7, stop=["blue"])
        assert stopped.choices[0].message.content == "a " and stopped.choices[0].finish_reason == "stop"
        assert stopped.usage.completion_tokens == until_blue < whole.usage.completion_tokens
        assert server.scheduler.generated_tokens - before <= until_blue + 2 < whole.usage.completion_tokens
    finally:
        server.stop()


def test_an_answer_cut_inside_a_character_ends_before_it_through_every_door(pipe, monkeypatch):
    """An answer cut by its budget between the bytes of one character ended in U+FFFD (the stream
    had held that back, and the finished answer sent it at its end)."""
    from types import SimpleNamespace

    from unitoken_jax.inference.decode import Request

    tok = pipe.tokenizer
    ids = [int(i) for i in tok.encode_text("a café near")]
    half = next(ids[:i] for i in range(len(ids), 0, -1) if tok.decode_text(ids[:i]).endswith("\ufffd"))
    assert decode(half, tok) == ["a caf\ufffd"] and decode(half, tok, unfinished=True) == ["a caf"]
    # an answer that ended there (its end of turn) keeps what the model wrote, said as it is
    assert decode(half + [layout.END_OF_TURN], tok, unfinished=False) == ["a caf\ufffd"]
    engine = PipelineEngine(pipe, max_rows=4)
    out = engine._output(Request(tokens=np.array([1]), max_new_tokens=len(half)), np.array(half))
    assert out.parts == ["a caf"] and out.finish_reason == "length"
    out = engine._output(Request(tokens=np.array([1]), max_new_tokens=8), np.array(half + [layout.END_OF_TURN]))
    assert out.parts == ["a caf\ufffd"] and out.finish_reason == "stop"
    monkeypatch.setattr(pipe.decode_loop, "generate", lambda requests, **_: SimpleNamespace(
        tokens=[np.array(half, np.int32) for _ in requests]))
    picture = shapes.draw([Thing("red", "circle", "top left")])
    assert pipe.understand(picture, "What colour is the shape?", max_new_tokens=len(half)) == "a caf"


def test_a_text_stream_sends_settled_text_and_stops_at_a_stop_string(pipe):
    """`TextStream` on the bundled byte-level tokenizer, fed the ids one at a time: never half a
    character, never a stop string or anything past it, and the finished answer's rest completes it."""
    tok = pipe.tokenizer
    text = "a café ☃ near"
    ids = tok.encode_text(text)
    assert "\ufffd" in "".join(tok.decode_text(ids[:i]) for i in range(len(ids)))  # the case exists
    # overlapping stop strings: the one complete first wins ("☃" before "é ☃ near", which starts
    # earlier), as generation stops there: the stream and the finished answer cut at the same place
    for stop, expected in [([], text), (["☃ n"], "a café "), (["ar", "é ☃"], "a caf"),
                           (["é ☃ near", "☃"], "a café "), (["☃", "é ☃"], "a caf")]:
        stream = TextStream(tok, stop)
        sent = "".join(stream.update(ids[:i]) for i in range(len(ids) + 1))
        assert "\ufffd" not in sent and expected.startswith(sent), (stop, sent)
        parts, stopped = apply_stop([tok.decode_text(ids)], stop)
        assert stopped == bool(stop)
        assert sent + "".join(stream.rest(parts)) == expected
    # a picture ends the streamed text; it comes with the rest
    stream = TextStream(tok, [])
    picture = np.zeros((2, 2), np.int32)
    answer = list(ids) + [layout.IMAGE_START, 8196]
    assert "".join(stream.update(answer[:i]) for i in range(len(answer) + 1)) == text
    assert stream.rest([text, picture])[0] is picture
    assert TextStream(tok, [], starts_in_picture=True).update(ids) == ""
    with pytest.raises(ValueError, match="not how the answer begins"):
        stream.rest(["something else"])
    # an end of turn the request did not stop at (stop_tokens=()): the answer's text goes on past it, as
    # `decode` reads it, and so does the stream (it stopped there, and the rest was never streamed)
    more = list(ids) + [layout.END_OF_TURN] + list(tok.encode_text(" and more"))
    stream = TextStream(tok, [])
    sent = "".join(stream.update(more[:i]) for i in range(len(more) + 1))
    assert sent == decode(more, tok)[0] == text + " and more"


def test_images_generate_draws_what_was_asked(server):
    client = server.client()
    asked = [Thing("red", "circle", "top left"), Thing("green", "square", "bottom right")]
    for thing in asked:
        result = client.images.generate(model=MODEL, prompt=shapes.caption([thing]), n=2, size=SIZE,
                                        response_format="b64_json", extra_body={"guidance_scale": 3, "seed": 11})
        assert len(result.data) == 2
        for item in result.data:
            picture = _picture(item.b64_json)
            assert picture.format == "PNG" and picture.size == (64, 64)
            assert shapes.check_picture(picture).matches(thing), (thing, shapes.check_picture(picture))
        assert result.data[0].b64_json != result.data[1].b64_json  # seeds 11 and 12


def test_a_chat_answer_with_a_picture_carries_it_as_an_image_part(server):
    thing = Thing("blue", "square", "bottom right")
    answer = server.client().chat.completions.create(
        model=MODEL, seed=3, messages=[{"role": "user", "content": shapes.generate_prompt(thing)}])
    content = answer.choices[0].message.content
    assert isinstance(content, list), content
    (part,) = [p for p in content if p["type"] == "image_url"]
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert shapes.check_picture(_picture(url.split(",", 1)[1])).matches(thing)
    # guided (an extra field, as for images): still right, and the guidance changed the picture
    guided = server.client().chat.completions.create(
        model=MODEL, seed=3, messages=[{"role": "user", "content": shapes.generate_prompt(thing)}],
        extra_body={"guidance_scale": 3})
    (guided_part,) = [p for p in guided.choices[0].message.content if p["type"] == "image_url"]
    guided_url = guided_part["image_url"]["url"]
    assert shapes.check_picture(_picture(guided_url.split(",", 1)[1])).matches(thing)
    assert guided_url != url


def test_images_edit_takes_a_picture_and_an_instruction(server):
    picture = shapes.draw([Thing("red", "square", "top right")])

    def edit(seed):
        result = server.client().images.edit(model=MODEL, image=("square.png", _png(picture), "image/png"),
                                             prompt="make it blue", size=SIZE, n=1, extra_body={"seed": seed})
        (item,) = result.data
        return item.b64_json

    first = edit(1)
    assert _picture(first).size == (64, 64)  # the bundled model was not taught edits: any picture
    assert edit(1) == first != edit(2)  # the seed travels in the multipart form
    # a JSON body is said to be one (it read as an empty form: "send exactly one picture ... (got 0)")
    said = _error(_post(server, "/v1/images/edits", json={"model": MODEL, "prompt": "make it blue"}), 400, None,
                  "invalid_form")
    assert "takes a multipart form" in said["message"] and "application/json" in said["message"]
    # a prompt field that is not UTF-8 (GBK's "red") was read as Latin-1 and drawn from its mojibake; a
    # UTF-8 one of any script is taken
    form = {"model": (None, MODEL), "size": (None, SIZE), "image": ("square.png", _png(picture), "image/png")}
    said = _error(_post(server, "/v1/images/edits", files={**form, "prompt": (None, "\u7ea2\u8272".encode("gbk"))}),
                  400, "prompt", "invalid_form")
    assert "is not UTF-8 text" in said["message"]
    taken = _post(server, "/v1/images/edits", files={**form, "prompt": (None, "rouge caf\u00e9 \u7ea2".encode())})
    assert taken.status_code == 200, taken.text


def test_models_lists_the_one_model(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


# --- many clients at once ----------------------------------------------------------------------------
QUESTIONS = [(Thing(c, s, p), q) for (c, s, p), q in zip(
    [("red", "circle", "top left"), ("green", "triangle", "top right"), ("blue", "square", "bottom left"),
     ("yellow", "circle", "bottom right"), ("red", "triangle", "bottom right"), ("blue", "circle", "top right"),
     ("green", "square", "top left"), ("yellow", "square", "bottom left")],
    ["What colour is the shape?", "What shape is this?", "Where is the shape?", "What colour is the shape?",
     "What shape is this?", "Where is the shape?", "Describe the picture.", "How many shapes are there?"])]
DRAWINGS = [Thing(c, s, p) for c, s, p in [
    ("red", "square", "top right"), ("green", "circle", "bottom left"), ("blue", "triangle", "top left"),
    ("yellow", "triangle", "top right"), ("red", "circle", "bottom left"), ("green", "triangle", "bottom right"),
    ("blue", "square", "top left"), ("yellow", "circle", "bottom right")]]


def _call(client, i, pictures):
    """Call i of the 16: a question about a picture (even i) or a guided picture (odd i)."""
    if i % 2 == 0:
        thing, question = QUESTIONS[i // 2]
        answer = client.chat.completions.create(model=MODEL, messages=_question(pictures[i // 2], question),
                                                seed=100 + i, max_tokens=32)
        return answer.choices[0].message.content
    drawn = client.images.generate(model=MODEL, prompt=shapes.caption([DRAWINGS[i // 2]]), size=SIZE,
                                   extra_body={"guidance_scale": 3, "seed": 100 + i})
    return _picture(drawn.data[0].b64_json).convert("RGB")


def _burst(server, pictures):
    """The 16 calls from 16 threads at once: their answers in call order."""
    client = server.client(timeout=300)
    results: list = [None] * 16
    barrier = threading.Barrier(16)

    def ask(i):
        barrier.wait()
        results[i] = _call(client, i, pictures)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def _alone(pipe, pictures):
    """Each of the 16 requests run by itself through the pipeline, as the server builds them
    (app.py): their answers."""
    results = []
    for i in range(16):
        if i % 2 == 0:
            thing, question = QUESTIONS[i // 2]
            request = pipe.chat_request([{"from": "human", "value": f"<|image|>\n{question}"}], [pictures[i // 2]],
                                        seed=100 + i, max_new_tokens=32)
            (parts,) = pipe.run([request], repair=True)
            results.append("".join(parts))
        else:
            request = pipe.generate_request(shapes.caption([DRAWINGS[i // 2]]), size=(64, 64), cfg=3.0, seed=100 + i)
            (parts,) = pipe.run([request])
            results.append(parts[0])
    return results


def test_sixteen_concurrent_clients_get_what_each_gets_alone(server, pipe):
    rng = np.random.default_rng(0)
    pictures = [shapes.draw([thing], rng) for thing, _ in QUESTIONS]
    batched = _burst(server, pictures)
    assert all(r is not None for r in batched), "a call got no answer"
    alone = _alone(pipe, pictures)  # what each call gives run alone through the pipeline

    # greedy text: identical
    assert [batched[i] for i in range(0, 16, 2)] == [alone[i] for i in range(0, 16, 2)]
    assert [batched[i] for i in range(0, 4, 2)] == ["red", "triangle"]
    # pictures: the same codes (so the same pixels) as alone; checked by the pixel checker as well
    same = [np.array_equal(np.asarray(batched[i]), np.asarray(alone[i].convert("RGB"))) for i in range(1, 16, 2)]
    readings = [shapes.check_picture(batched[i]) for i in range(1, 16, 2)]
    assert all(r.matches(t) for r, t in zip(readings, DRAWINGS)), readings
    print(f"pictures identical to the run alone: {sum(same)} of 8")
    assert all(same), f"only {sum(same)} of 8 pictures equal their run alone"


def test_continuous_batching_answers_as_alone(pipe):
    """--batching continuous: the 16 concurrent calls get what each gets alone (greedy text,
    identical pictures)."""
    settings = ServeSettings(model_name=MODEL, api_key=KEY, max_batch=32, default_size=(64, 64), sizes=((64, 64),),
                             batching="continuous")
    server = _Running(create_app(pipe, settings))
    try:
        rng = np.random.default_rng(0)
        pictures = [shapes.draw([thing], rng) for thing, _ in QUESTIONS]
        together = _burst(server, pictures)
        alone = _alone(pipe, pictures)
        assert [together[i] for i in range(0, 16, 2)] == [alone[i] for i in range(0, 16, 2)]
        same = [np.array_equal(np.asarray(together[i]), np.asarray(alone[i].convert("RGB"))) for i in range(1, 16, 2)]
        assert all(same), f"only {sum(same)} of 8 pictures equal their run alone"

        # a follow-up turn (the client sends the history again) continues in the slot that holds
        # the first: its shared positions are not computed again, and it answers as alone
        assert _metric(server, "unitoken_prompt_positions_reused_total") == 0
        thing, question = QUESTIONS[0]
        follow_up = _question(pictures[0], question) + [{"role": "assistant", "content": together[0]},
                                                        {"role": "user", "content": "Where is the shape?"}]
        answer = server.client(timeout=300).chat.completions.create(model=MODEL, messages=follow_up, seed=7,
                                                                    max_tokens=32).choices[0].message.content
        request = pipe.chat_request([{"from": "human", "value": f"<|image|>\n{question}"},
                                     {"from": "gpt", "value": together[0]},
                                     {"from": "human", "value": "Where is the shape?"}], [pictures[0]], seed=7,
                                    max_new_tokens=32)
        assert answer == "".join(pipe.run([request], repair=True)[0])
        assert _metric(server, "unitoken_prompt_positions_reused_total") > len(request.tokens) // 2
    finally:
        server.stop()


def test_a_continuous_servers_slot_length_bounds_its_calls(pipe):
    """With `--slot-length` below the model's positions, an answer without max_tokens takes what
    the slot leaves; a max_tokens or a picture the slot cannot hold gets 400 naming the slot length."""
    settings = ServeSettings(model_name=MODEL, api_key=KEY, max_batch=4, default_size=(64, 64),
                             sizes=((64, 64), (128, 128)), batching="continuous", slot_length=64)
    server = _Running(create_app(pipe, settings))
    try:
        messages = [{"role": "user", "content": "Describe the picture."}]
        reply = server.client(timeout=120).chat.completions.create(model=MODEL, messages=messages)
        assert reply.choices[0].message.content
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 64
        error = _error(_post(server, "/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                                   "max_tokens": 100}),
                       400, "max_tokens", "context_length_exceeded")
        assert "(--slot-length) 64 positions" in error["message"]
        # messages that alone fill the slot: they are what to shorten, whatever max_tokens asks (the
        # error named max_tokens and "leaving -81 for the answer")
        long = [{"role": "user", "content": "a red circle at the top left " * 12}]
        for extra in ({}, {"max_tokens": 8}):
            error = _error(_post(server, "/v1/chat/completions", json={"model": MODEL, "messages": long, **extra}),
                           400, "messages", "context_length_exceeded")
            assert re.search(r"the conversation takes \d+ positions, more than this server's \(--slot-length\) 64 "
                             r"leave room for an answer in", error["message"]), error["message"]
        # a 128x128 picture needs 100 positions with its prompt: the model has them, a slot does not
        error = _error(_post(server, "/v1/images/generations", json={"model": MODEL, "prompt": "a red circle",
                                                                     "size": "128x128"}),
                       400, code="context_length_exceeded")
        assert "slots of 64 positions (--slot-length)" in error["message"]
    finally:
        server.stop()


def test_a_question_overtakes_a_long_answer_with_continuous_batching(pipe):
    """The continuous scheduler admits a short question while a 400-token answer is decoding, and
    the question finishes first; the static one makes it wait for the running batch."""
    long = pipe.understand_request([], "Describe the picture.", max_new_tokens=400, temperature=1.0, seed=3)
    long = dataclasses.replace(long, stop_tokens=())  # never ends early: it runs its 400 tokens
    short = pipe.understand_request([shapes.draw([Thing("red", "circle", "top left")])], "What colour is the shape?",
                                    max_new_tokens=8)
    order = {}
    for kind in ("continuous", "static"):
        engine = PipelineEngine(pipe, max_rows=8, chunk=8)
        scheduler = (ContinuousScheduler(engine, slots=8, length=512, queue_limit=8, chunk=8) if kind == "continuous"
                     else Scheduler(engine, max_rows=8, queue_limit=8))
        scheduler.start()
        try:
            for _ in range(2):  # the first run compiles what the second runs warm
                done, events = threading.Event(), []
                started = threading.Event()
                long_job = Job([long], on_finish=lambda out: (events.append("long"), done.set()),
                               on_progress=lambda n: started.set())
                short_job = Job([short], on_finish=lambda out: events.append(("short", out)))
                scheduler.submit(long_job)
                assert started.wait(60) or kind == "static"
                if kind == "static":
                    time.sleep(0.05)  # the long batch has started
                scheduler.submit(short_job)
                assert done.wait(120)
                deadline = time.monotonic() + 60
                while len(events) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
            order[kind] = [e if isinstance(e, str) else e[0] for e in events]
            answer = next(e[1] for e in events if not isinstance(e, str))
            assert "".join(p for p in answer[0].parts if isinstance(p, str)) == "red"
            assert len(answer[0].ids) <= 8
        finally:
            scheduler.stop()
    assert order == {"continuous": ["short", "long"], "static": ["long", "short"]}, order


def _device_fault():
    raise RuntimeError("simulated device fault")


def test_a_failed_chunk_fails_its_calls_and_the_continuous_worker_serves_the_next(pipe, monkeypatch):
    """A chunk that fails on the device (the state the loop was donated gone) fails the running
    calls with the error; the worker lives on and the next call gets what it gets alone. A guided
    picture's tokens are counted once, not again on its unconditional partner's row."""
    import functools

    import jax

    @functools.partial(jax.jit, donate_argnums=(0,))
    def consume(state):
        jax.debug.callback(_device_fault)
        return jax.tree.map(lambda x: x + 0 if x.dtype != bool else x, state)

    loop = pipe.decode_loop
    question = pipe.understand_request([shapes.draw([Thing("red", "circle", "top left")])],
                                       "What colour is the shape?", max_new_tokens=8)
    picture = pipe.generate_request("a blue square at the bottom right", size=(64, 64), cfg=3.0, seed=1)
    scheduler = ContinuousScheduler(PipelineEngine(pipe, max_rows=4, chunk=8), slots=4, length=512, queue_limit=4)
    scheduler.start()

    def run(requests, timeout=120):
        done, got = threading.Event(), []
        scheduler.submit(Job(requests, on_finish=lambda out: (got.append(out), done.set())))
        assert done.wait(timeout), "the call never finished"
        return got[0]

    try:
        with monkeypatch.context() as m:
            m.setattr(loop, "_run", lambda params, state, *rest: consume(state))
            failed = run([question])
        assert isinstance(failed, Exception) and "simulated device fault" in str(failed)
        assert scheduler._thread.is_alive() and scheduler.failed_batches == 1
        answer = run([question])
        np.testing.assert_array_equal(answer[0].ids, pipe.decode_loop.generate([question]).tokens[0])
        before = scheduler.generated_tokens
        drawn = run([picture])
        assert scheduler.generated_tokens - before == len(drawn[0].ids)
    finally:
        scheduler.stop()


def _run_job(scheduler, requests, timeout=120):
    done, got = threading.Event(), []
    scheduler.submit(Job(requests, on_finish=lambda out: (got.append(out), done.set())))
    assert done.wait(timeout), "the call never finished"
    return got[0]


def test_a_call_dropped_while_a_batch_gathers_leaves_the_worker_serving(pipe):
    """With `batch_wait`, the worker waits for more calls before a batch; the only one waiting may
    be dropped meanwhile (its client gone). The worker had then sized a batch of nothing, died,
    and every later call waited for its timeout."""
    question = pipe.understand_request([shapes.draw([Thing("red", "circle", "top left")])],
                                       "What colour is the shape?", max_new_tokens=8)
    scheduler = Scheduler(PipelineEngine(pipe, max_rows=4), max_rows=4, queue_limit=4, batch_wait=0.5)
    scheduler.start()
    try:
        _run_job(scheduler, [question])  # compiled: the next batch's gathering is the only wait
        scheduler.submit(Job([question], on_finish=lambda out: pytest.fail("a dropped call was answered")))
        time.sleep(0.1)  # the worker is gathering
        assert scheduler.cancel(scheduler._waiting[0]) and scheduler.queue_length == 0
        time.sleep(0.6)  # its wait ends on an empty queue
        assert scheduler.alive
        (answer,) = _run_job(scheduler, [question], timeout=60)
        assert "".join(answer.parts) == "red"
    finally:
        scheduler.stop()
    assert not scheduler.alive


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_a_chat_picture_cut_after_its_size_is_completed_and_the_worker_serves_on(pipe, batching):
    """A chat answer cut by max_tokens right after its picture's size tokens has no code to repeat:
    the grid was filled with the lowest code id, which is code 4150 to the bundled tokenizer and no
    code of its 256-code VQ-GAN, so reading it back raised. That failed every call of a static
    batch, and killed the continuous worker (every later call then waited for its timeout). The
    grid is now filled with code 0; and an answer that still cannot be read fails its own call."""
    draw = pipe.chat_request([{"from": "human", "value": pipe.generate_template.format(
        w=64, h=64, prompt="a blue square at the bottom right")}], max_new_tokens=3, seed=3)
    question = pipe.understand_request([shapes.draw([Thing("red", "circle", "top left")])],
                                       "What colour is the shape?", max_new_tokens=8)
    engine = PipelineEngine(pipe, max_rows=4, chunk=8)
    scheduler = (Scheduler(engine, max_rows=4, queue_limit=4) if batching == "static" else
                 ContinuousScheduler(engine, slots=4, length=512, queue_limit=4))
    scheduler.start()
    try:
        drawn, answered = _run_job(scheduler, [draw, question])
        assert drawn.ids[0] == layout.IMAGE_START and len(drawn.ids) == 3 and drawn.finish_reason == "length"
        (picture,) = drawn.parts
        assert isinstance(picture, Image.Image) and picture.size == (64, 64)
        assert "".join(answered.parts) == "red"
        with mock.patch.object(engine, "_output", side_effect=ValueError("unreadable")):
            failed = _run_job(scheduler, [question])
        assert isinstance(failed, ValueError) and scheduler.alive
        (again,) = _run_job(scheduler, [question])
        assert "".join(again.parts) == "red"
    finally:
        scheduler.stop()


def test_health_says_when_the_decoding_worker_has_stopped(pipe):
    running = _Running(create_app(pipe, ServeSettings(model_name=MODEL, default_size=(64, 64))))
    try:
        health = requests_http.get(running.url + "/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        running.scheduler.stop()
        health = requests_http.get(running.url + "/health")
        assert health.status_code == 503 and "worker has stopped" in health.json()["status"]
    finally:
        running.stop()


def test_a_stop_that_outlasts_its_timeout_tells_each_continuous_call_once(pipe, monkeypatch):
    """`stop(timeout)` returns while a chunk still runs (a long compile): each call is told exactly
    once, the one that chunk finishes its answer and the one it does not that the server is
    shutting down, and the worker ends cleanly instead of failing on a call `stop` let go of."""
    scheduler = ContinuousScheduler(PipelineEngine(pipe, max_rows=4, chunk=8), slots=4, length=512, queue_limit=4)
    stepping, release = threading.Event(), threading.Event()
    step = scheduler.decoder.step

    def held():
        stepping.set()
        assert release.wait(60)
        return step()

    monkeypatch.setattr(scheduler.decoder, "step", held)
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    told = {"short": [], "long": []}
    short = pipe.understand_request([], "What colour is the shape?", max_new_tokens=4)  # done in one chunk
    long = dataclasses.replace(pipe.understand_request([], "Describe the picture.", max_new_tokens=40),
                               stop_tokens=())
    scheduler.start()
    try:
        with scheduler._cond:  # both are admitted before the first chunk
            for name, request in (("short", short), ("long", long)):
                scheduler.submit(Job([request], on_finish=told[name].append))
        assert stepping.wait(60)
        scheduler.stop(timeout=0.05)
        assert scheduler._thread.is_alive() and told == {"short": [], "long": []}
    finally:
        release.set()
    scheduler._thread.join(60)
    assert not scheduler._thread.is_alive() and errors == []
    assert len(told["short"]) == 1 and len(told["short"][0][0].ids) == 4, told
    assert len(told["long"]) == 1 and isinstance(told["long"][0], ShuttingDown), told


def test_a_prefill_does_not_hold_up_the_calls_of_the_event_loop(pipe, monkeypatch):
    """While the continuous worker admits a call (a prefill, maybe a compile), `submit`,
    `queue_length` and `cancel`, which the server calls on its event loop, answer at once."""
    scheduler = ContinuousScheduler(PipelineEngine(pipe, max_rows=4, chunk=8), slots=4, length=512, queue_limit=4)
    admitting, release = threading.Event(), threading.Event()
    admit_many = scheduler.decoder.admit_many

    def held(requests):
        admitting.set()
        assert release.wait(60)
        return admit_many(requests)

    monkeypatch.setattr(scheduler.decoder, "admit_many", held)
    question = pipe.understand_request([], "What colour is the shape?", max_new_tokens=4)
    finished = []
    scheduler.start()
    try:
        scheduler.submit(Job([question], on_finish=finished.append))
        assert admitting.wait(60)
        answered = threading.Event()

        def caller():
            second = Job([question], on_finish=finished.append)
            scheduler.submit(second)
            assert scheduler.queue_length == 1
            assert scheduler.cancel(second)
            answered.set()

        threading.Thread(target=caller, daemon=True).start()
        assert answered.wait(10), "submit / queue_length / cancel waited for the prefill"
    finally:
        release.set()
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.stop()
    assert len(finished) == 1 and not isinstance(finished[0], Exception)


# --- refusals ----------------------------------------------------------------------------------------
def _post(server, path, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests_http.post(server.url + path, headers=headers, timeout=60, **kw)


def _error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("field,value,says", [
    ("max_batch", 0, "at least 1"), ("queue_limit", -1, "at least 1"), ("timeout", 0.0, "positive"),
    ("timeout", float("nan"), "positive"), ("max_body_bytes", 0, "positive"), ("batch_wait", -0.5, "0 or more"),
    ("batching", "dynamic", "choose 'continuous' or 'static'"), ("slot_chunk", 0, "at least 1 step"),
    ("slot_length", 1, "a slot holds 2 to the model's positions"),
])
def test_server_settings_a_server_cannot_run_with_are_refused_by_name(field, value, says):
    """For a server built in Python, as the settings are made (the CLI checks its options before the
    model loads, too); a slot longer than the model's positions, once those are known."""
    ServeSettings(slot_length=64).validate(64)  # (the defaults pass, and a slot of all the positions)
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}") + ".*" + re.escape(says)):
        ServeSettings(**{field: value})
    too_long = ServeSettings(slot_length=65)
    with pytest.raises(ValueError, match=re.escape("slot_length=65: a slot holds 2 to the model's 64 positions")):
        too_long.validate(64)


@pytest.mark.parametrize("key", [" secret", "secret\n", "   ", "sécret"])
def test_an_api_key_no_header_could_carry_is_refused_without_showing_it(key):
    ServeSettings(api_key="s3cret-Key_1").validate()
    with pytest.raises(ValueError, match="api_key: a key with spaces") as refused:
        ServeSettings(api_key=key)
    assert key.strip() not in str(refused.value) or not key.strip()


def test_a_data_url_is_read_whatever_the_case_of_its_scheme_type_and_base64():
    """RFC 2397 / 3986: a scheme, a MIME type and the "base64" word have no case; `DATA:IMAGE/PNG;BASE64,`
    was refused as "not a data URL"."""
    picture = shapes.draw([Thing("red", "circle", "top left")])
    data = base64.b64encode(_png(picture)).decode()
    for head in ("data:image/png;base64,", "DATA:IMAGE/PNG;BASE64,", "Data:Image/Png;Base64,"):
        read = read_data_url(head + data, "messages[0].content[0].image_url", Limits())
        assert np.array_equal(np.asarray(read.convert("RGB")), np.asarray(picture.convert("RGB"))), head


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    picture = shapes.draw([Thing("red", "circle", "top left")])
    good = {"model": MODEL, "messages": _question(picture, "What colour is the shape?"), "seed": 0}
    chat = "/v1/chat/completions"
    _error(_post(server, chat, data=b'{"model": "unitoken-shapes", "messages": [}'), 400, code="invalid_json")
    _error(_post(server, chat, json={**good, "model": "gpt-5"}), 404, "model", "model_not_found")
    not_a_picture = "data:image/png;base64," + base64.b64encode(b"this is not a picture").decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": not_a_picture}},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    _error(_post(server, chat, json={**good, "messages": messages}), 400, "messages[0].content[0].image_url",
           "invalid_image")
    messages[0]["content"][0]["image_url"]["url"] = "file:///etc/passwd"
    _error(_post(server, chat, json={**good, "messages": messages}), 400, "messages[0].content[0].image_url",
           "invalid_image_url")
    truncated = _png(picture)[:200]
    messages[0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(truncated).decode()
    _error(_post(server, chat, json={**good, "messages": messages}), 400, "messages[0].content[0].image_url")
    _error(_post(server, chat, data=b"x" * (100 * 1024 * 1024)), 413, code="request_too_large")
    chunked = (b"x" * (1024 * 1024) for _ in range(20))  # no Content-Length: cut off as it passes 16 MB
    _error(_post(server, chat, data=chunked), 413, code="request_too_large")
    _error(_post(server, chat, json={**good, "temperature": -0.5}), 400, "temperature")
    _error(_post(server, chat, json={**good, "guidance_scale": -1}), 400, "guidance_scale")
    _error(_post(server, chat, json={**good, "n": 1000}), 400, "n")
    _error(_post(server, chat, json={**good, "max_tokens": 100000}), 400, "max_tokens", "context_length_exceeded")
    _error(_post(server, chat, json={**good, "tools": [{"type": "function"}]}), 400, "tools")
    _error(_post(server, chat, json={**good, "bogus": 1}), 400, "bogus")
    for field in ("seed", "n", "max_tokens", "temperature", "top_k"):  # no float holds them: a 500 before
        _error(_post(server, chat, json={**good, field: 10 ** 400}), 400, field, "invalid_value")
    # a lone surrogate is valid JSON but no UTF-8: echoed back in the error, it had made a 500
    assert "x\ud800" in _error(_post(server, chat, json={**good, "model": "x\ud800"}), 404, "model")["message"]
    _error(_post(server, chat, json={**good, "x\ud800": 1}), 400, "x\ud800", "unknown_parameter")
    _error(_post(server, chat, json={**good, "stream": True, "stream_options": {"include_usage": "no"}}), 400,
           "stream_options")  # read as true before
    draw = {"model": MODEL, "prompt": "a red circle at the top left", "size": SIZE}
    images = "/v1/images/generations"
    _error(_post(server, images, json={**draw, "size": "1024x1024"}), 400, "size", "invalid_size")
    _error(_post(server, images, json={**draw, "n": 1000}), 400, "n")
    _error(_post(server, images, json={**draw, "response_format": "url"}), 400, "response_format")
    _error(_post(server, images, json={**draw, "guidance_scale": -1}), 400, "guidance_scale")
    _error(_post(server, "/v1/images/edits", data={"prompt": "make it blue"}), 400, None, "invalid_form")
    _error(_post(server, "/v1/images/edits", files=[("image", ("x.png", _png(picture), "image/png")),
                                                    ("prompt", (None, "make it blue")), ("n", (None, "1")),
                                                    ("n", (None, "2"))]), 400, "n")  # (the last was used)
    _error(_post(server, "/v1/images/edits", files={"image": ("x.png", _png(picture), "image/png")},
                 data={"prompt": "make it blue", "n": "9" * 5000}), 400, "n")  # more digits than Python reads
    _error(_post(server, "/v1/images/edits", files={"image": ("x.png", b"not a picture", "image/png")},
                 data={"prompt": "make it blue"}), 400, "image", "invalid_image")
    _error(requests_http.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    # the server goes on: the same good request is answered
    answer = _post(server, chat, json=good)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "red"
    text = requests_http.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'unitoken_requests_total{endpoint="/v1/chat/completions",status="413"} 2' in text


def test_a_negative_prompt_the_model_cannot_take_is_refused_by_its_own_name(server, pipe):
    """Too long by itself, or too long to leave its row the picture's positions: either way the 400
    names `negative_prompt`, not the prompt or the size, which were fine."""
    draw = {"model": MODEL, "prompt": "a red circle at the top left", "size": SIZE}
    images = "/v1/images/generations"
    alone = _error(_post(server, images, json={**draw, "negative_prompt": "cat " * 5000}), 400, "negative_prompt",
                   "context_length_exceeded")
    assert "the negative prompt" in alone["message"]
    words = 1
    while True:  # the shortest negative prompt that fits the model but not beside a 64x64 picture
        try:
            pipe.generate_request(draw["prompt"], size=(64, 64), negative_prompt="cat " * words)
        except ValueError as e:
            assert "positions" in str(e) and "the negative prompt" in str(e)
            break
        words += 1
    beside = _error(_post(server, images, json={**draw, "negative_prompt": "cat " * words}), 400, "negative_prompt",
                    "context_length_exceeded")
    assert "64x64 picture need" in beside["message"]
    assert _post(server, images, json={**draw, "negative_prompt": "cat " * (words - 1)}).status_code == 200
    # guidance 1 is none, so a negative prompt would change nothing: said, not dropped
    off = _error(_post(server, images, json={**draw, "negative_prompt": "cat", "guidance_scale": 1}), 400,
                 "negative_prompt")
    assert "guidance_scale 1 is none" in off["message"]


def test_text_that_is_not_plain_is_refused_by_the_field_it_came_in(server):
    """A picture's mark or a lone surrogate in an image call's prompt was refused as the size's fault
    (param 'size', code invalid_size), one in its negative prompt as too long; a lone surrogate in a
    chat message named no field, and one in a stop string was taken though it can never match."""
    import json

    draw = {"model": MODEL, "prompt": "a red circle at the top left", "size": SIZE}
    images, chat = "/v1/images/generations", "/v1/chat/completions"

    def post(path, body):  # (JSON's own escapes: a lone surrogate cannot be sent as UTF-8)
        return _post(server, path, data=json.dumps(body))

    for body, param, says in (({**draw, "prompt": "<|image|>"}, "prompt", "the prompt contains '<|image|>'"),
                              ({**draw, "prompt": "a \ud800"}, "prompt", "not valid Unicode"),
                              ({**draw, "negative_prompt": "<|image|>"}, "negative_prompt",
                               "the negative prompt contains '<|image|>'"),
                              ({**draw, "negative_prompt": "\udfff"}, "negative_prompt", "not valid Unicode")):
        error = _error(post(images, body), 400, param)
        assert error["code"] not in ("invalid_size", "context_length_exceeded") and says in error["message"], error
    # a prompt too long beside its picture is the prompt's, not the size's
    error = _error(post(images, {**draw, "prompt": " a" * 473}), 400, "prompt", "context_length_exceeded")
    assert "the prompt takes" in error["message"], error
    question = {"model": MODEL, "messages": [{"role": "user", "content": "What is it? \ud800"}]}
    assert "not valid Unicode" in _error(post(chat, question), 400, "messages[0].content")["message"]
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "What is it?"}]}
    _error(post(chat, {**plain, "stop": ["\ud800"]}), 400, "stop")


def test_openai_fields_sent_null_or_at_their_plain_value_are_accepted(server):
    """Clients that send every field (null when unset), and the official client's own stream and
    edit options at their neutral values, are served; a value this server cannot honour is still
    refused by name, and an out-of-range top_k is the caller's 400, not a 500."""
    chat = "/v1/chat/completions"
    good = {"model": MODEL, "messages": _question(shapes.draw([Thing("red", "circle", "top left")]),
                                                  "What colour is the shape?")}
    nulls = {"audio": None, "modalities": ["text"], "reasoning_effort": None, "functions": None,
             "function_call": None, "prediction": None, "logprobs": None, "top_logprobs": None}
    answer = _post(server, chat, json={**good, **nulls})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "red", answer.text
    streamed = server.client().chat.completions.create(
        model=MODEL, messages=good["messages"], stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "red"
    _error(_post(server, chat, json={**good, "modalities": ["text", "audio"]}), 400, "modalities",
           "unsupported_parameter")
    # OpenAI's own defaults are its plain values too (they were refused), and its bounds hold here
    streamed = _post(server, chat, json={**good, "verbosity": "medium", "stream": True,
                                         "stream_options": {"include_obfuscation": True, "include_usage": True}})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert streamed.status_code == 200 and len(chunks) >= 3, streamed.text
    # with include_usage every chunk has `usage`, null but in the last (OpenAI's stream); every
    # object has `system_fingerprint`, null here
    assert all("usage" in c and c["system_fingerprint"] is None for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert answer.json()["system_fingerprint"] is None
    _error(_post(server, chat, json={**good, "stream": True, "stream_options": {"include_obfuscation": "yes"}}),
           400, "stream_options")
    _error(_post(server, chat, json={**good, "temperature": 2.5}), 400, "temperature")
    _error(_post(server, chat, json={**good, "user": 123}), 400, "user")
    _error(_post(server, chat, json={**good, "top_k": 3_000_000_000}), 400, "top_k", "invalid_value")
    edited = server.client().images.edit(model=MODEL, image=("red.png", _png(shapes.draw([Thing("red", "circle",
                                                                                             "top left")])),
                                                             "image/png"),
                                         prompt="make it blue", size=SIZE, stream=False, partial_images=0,
                                         input_fidelity="low", extra_body={"safety_identifier": "user-7"})
    assert len(edited.data) == 1
    red = ("red.png", _png(shapes.draw([Thing("red", "circle", "top left")])), "image/png")
    with pytest.raises(openai.BadRequestError) as refused:  # (named: it was "image", as if the picture were wrong)
        server.client().images.edit(model=MODEL, image=red, prompt="x", size=SIZE, markup=red)
    assert refused.value.body["param"] == "markup"
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().images.edit(model=MODEL, image=red, prompt="x", size=SIZE, input_fidelity="high")
    assert refused.value.body["param"] == "input_fidelity"
    # DALL-E 3's default quality, which its clients send, is the plain one here (refused before); "hd" is not
    assert len(server.client().images.generate(model=MODEL, prompt="a red circle", size=SIZE,
                                               quality="standard").data) == 1
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().images.generate(model=MODEL, prompt="a red circle", size=SIZE, quality="hd")
    assert refused.value.body["param"] == "quality"
    # output_compression is 100 (the least) unless asked: PIL's defaults wrote JPEG at 75 and lossy WebP
    for fmt in ("jpeg", "webp"):
        drawn = server.client().images.generate(model=MODEL, prompt="a red circle at the top left", size=SIZE,
                                                output_format=fmt, output_compression=100, extra_body={"seed": 1})
        raw = base64.b64decode(drawn.data[0].b64_json)
        if fmt == "jpeg":  # quality 100: every quantization step 1
            assert set(Image.open(io.BytesIO(raw)).quantization[0]) == {1}
        else:  # a lossless WebP's chunk
            assert raw[12:16] == b"VP8L", raw[:16]


def test_a_neutral_field_s_value_must_be_of_its_type():
    """`logprobs: false` and `frequency_penalty: 0.0` are neutral; `logprobs: 0` and
    `frequency_penalty: false` are wrong types (equal in Python, 0 == False), refused by name."""
    def call(**fields):
        return parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}, MODEL, Limits())

    for fine in (dict(logprobs=False), dict(frequency_penalty=0.0), dict(top_logprobs=0), dict(parallel_tool_calls=True)):
        assert call(**fine).conversation == [{"from": "human", "value": "hi"}]
    for wrong in (dict(logprobs=0), dict(frequency_penalty=False), dict(top_logprobs=False),
                  dict(parallel_tool_calls=1)):
        with pytest.raises(Exception, match=next(iter(wrong))):
            call(**wrong)


def test_an_edit_form_reads_its_numbers_as_json_does_and_sizes_as_the_cli_does():
    """A form's `n=2.0` is JSON's `n: 2.0` (taken; it was refused as a string), `n=2.5` is refused
    as no integer as in JSON, and `size` takes 'X' as the CLI's --size does (it was refused)."""
    from unitoken_jax.serve.wire import form_fields, parse_images

    def call(fields):
        return parse_images({"model": MODEL, "prompt": "a red circle", **fields}, MODEL, Limits(max_n=4),
                            default_size=(64, 64), sizes=None, default_guidance=3.0)

    for said in ("2", "2.0", " 2 "):
        assert call(form_fields({"n": said})).n == call({"n": 2}).n == 2
    assert call(form_fields({"seed": "7.0"})).seed == call({"seed": 7}).seed
    for bad in ("2.5", "two", "inf"):
        with pytest.raises(Exception, match="'n'"):
            call(form_fields({"n": bad}))
    assert call({"size": "64X32"}).size == call({"size": "64x32"}).size == (64, 32)


def test_message_orders_openai_takes_are_taken(server):
    """Two user messages in a row, a system message after the first turn, an assistant message with
    no content (tool calls only): OpenAI answers them, LangChain and agents send them, and this
    server refused each with a 400. Consecutive messages of one role are one turn; a later system
    message goes before the next user message (or after the last); system messages alone are the
    user's turn."""
    def conversation(*messages):
        return parse_chat({"model": MODEL, "messages": list(messages)}, MODEL, Limits()).conversation

    user, assistant = ({"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "hello")))
    assert conversation(user, {"role": "user", "content": "there"}) == [{"from": "human", "value": "hi\nthere"}]
    assert conversation(user, assistant, {"role": "system", "content": "be brief"}, user) == [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "be brief\nhi"}]
    assert conversation(user, {"role": "system", "content": "be brief"}) == [{"from": "human", "value": "hi\nbe brief"}]
    assert conversation(user, {"role": "assistant", "content": None}, user)[1] == {"from": "gpt", "value": ""}
    # system messages alone (OpenAI answers them): the models have no system turn, so they are the question
    assert conversation({"role": "system", "content": "be"}, {"role": "developer", "content": "brief"}) == [
        {"from": "human", "value": "be\nbrief"}]
    # an assistant's greeting first (chat UIs open so; it was refused): an empty user turn before it,
    # holding the system messages' text
    assert conversation(assistant, user) == [{"from": "human", "value": ""}, {"from": "gpt", "value": "hello"},
                                             {"from": "human", "value": "hi"}]
    assert conversation({"role": "system", "content": "be brief"}, assistant, user)[0] == {
        "from": "human", "value": "be brief"}
    for refused in ([{"role": "system", "content": "be brief"}, assistant], [user, assistant]):
        with pytest.raises(Exception, match="the last message must be the user's"):
            conversation(*refused)
    greeted = server.client().chat.completions.create(model=MODEL, messages=[
        {"role": "assistant", "content": "Hello! Send me a picture."},
        *_question(shapes.draw([Thing("red", "circle", "top left")]), "What colour is the shape?")])
    assert greeted.choices[0].message.content == "red"
    # through the wire: a picture and its question in two user messages are the one message they make
    # (the picture's base64 broken into MIME's lines of 76, which was refused as malformed)
    picture = shapes.draw([Thing("red", "circle", "top left")])
    (image, question) = _question(picture, "What colour is the shape?")[0]["content"]
    head, data = image["image_url"]["url"].split(",", 1)
    image["image_url"]["url"] = head + "," + "\r\n".join(data[i:i + 76] for i in range(0, len(data), 76))
    answer = server.client().chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": [image]}, {"role": "user", "content": question["text"]}])
    assert answer.choices[0].message.content == "red"


def test_modalities_say_whether_the_answer_may_draw_and_seeds_are_any_integer(server):
    """`modalities: ["text"]` (text only) still drew a picture, and ["text", "image"], which is what
    the server answers with, was refused; a seed past 2**32 or below 0 (OpenAI types it as any
    integer) was refused, and is now folded into the decode loop's 32 bits."""
    draw = [{"role": "user", "content": shapes.generate_prompt(Thing("blue", "square", "bottom right"))}]
    text_only = server.client().chat.completions.create(model=MODEL, seed=3, messages=draw, modalities=["text"])
    assert isinstance(text_only.choices[0].message.content, str)
    drawn = server.client().chat.completions.create(model=MODEL, seed=3, messages=draw,
                                                    extra_body={"modalities": ["text", "image"]})
    assert any(p["type"] == "image_url" for p in drawn.choices[0].message.content)
    _error(_post(server, "/v1/chat/completions", json={"model": MODEL, "messages": draw, "modalities": ["image"]}),
           400, "modalities", "unsupported_parameter")
    for odd in ([{"type": "text"}, "text"], [["text"]]):  # not a string: was a 500 (an unhashable set member)
        _error(_post(server, "/v1/chat/completions", json={"model": MODEL, "messages": draw, "modalities": odd}),
               400, "modalities", "unsupported_parameter")
    question = _question(shapes.draw([Thing("red", "circle", "top left")]), "What is in the picture?")

    def sampled(seed):
        return server.client().chat.completions.create(model=MODEL, messages=question, temperature=1.5,
                                                       max_tokens=12, seed=seed).choices[0].message.content

    assert sampled(-1) == sampled(2 ** 32 - 1) and sampled(2 ** 63 - 1) == sampled(2 ** 32 - 1)
    # top_p 0, which OpenAI takes (it was refused): the most likely token alone, whatever the temperature
    greedy = server.client().chat.completions.create(model=MODEL, messages=question, max_tokens=12, temperature=0)
    for seed in (1, 2):
        hot = server.client().chat.completions.create(model=MODEL, messages=question, temperature=1.5, top_p=0,
                                                      max_tokens=12, seed=seed)
        assert hot.choices[0].message.content == greedy.choices[0].message.content
    # the error names the length field the caller sent (LangChain sends max_completion_tokens)
    _error(_post(server, "/v1/chat/completions", json={"model": MODEL, "messages": question,
                                                       "max_completion_tokens": 100000}),
           400, "max_completion_tokens", "context_length_exceeded")


def test_a_web_page_of_an_allowed_origin_may_call_the_api_from_a_browser(server):
    """No CORS: a browser's preflight got 405 (401 with a key), and no answer let a page of another
    origin read it. `--cors-origin` names the pages that may."""
    preflight = requests_http.options(server.url + "/v1/chat/completions", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    # the official SDKs' own headers too (OpenAI's JavaScript client sends X-Stainless-*: refused, no call
    # of theirs was made), and a refused preflight in OpenAI's error JSON (it was plain text)
    asked = "authorization,content-type,x-stainless-lang,x-stainless-retry-count"
    sdk = requests_http.options(server.url + "/v1/chat/completions", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
    assert sdk.status_code == 200 and sdk.headers["access-control-allow-headers"].lower() == asked, sdk.text
    refused = requests_http.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    _error(refused, 400, code="cors_refused")
    assert "Disallowed CORS origin" in refused.json()["error"]["message"]
    answer = requests_http.get(server.url + "/v1/models", headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == PAGE
    other = requests_http.get(server.url + "/v1/models", headers={"Origin": "http://elsewhere.example",
                                                                  "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers
    _error(requests_http.get(server.url + "/v1/models", headers={"Origin": PAGE}), 401)  # the key is still needed
    with pytest.raises(ValueError, match="no path"):
        ServeSettings(cors_origins=("http://localhost:3000/app",))


def test_the_api_key_guards_every_endpoint_but_health(server):
    _error(requests_http.get(server.url + "/v1/models"), 401, code="invalid_api_key")
    _error(requests_http.get(server.url + "/metrics"), 401, code="invalid_api_key")
    _error(_post(server, "/v1/chat/completions", key=None, json={"messages": []}), 401, code="invalid_api_key")
    _error(_post(server, "/v1/images/generations", key="wrong", json={}), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert requests_http.get(server.url + "/health").json() == {"status": "ok"}
    assert requests_http.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --- the command -----------------------------------------------------------------------------------
def test_unitoken_serve_serves_the_bundled_model_with_the_key_from_the_environment(tmp_path, capsys):
    from unitoken_jax import cli

    assert cli.main(["serve", "--size", "128x128"]) == 2  # the bundled model draws 64x64 only
    # a port past 65535 is refused, not taken modulo 65536 by asyncio (99999 listened on 34463)
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", "--port", "99999"])
    assert stop.value.code == 2
    with pytest.raises(ValueError, match=re.escape("port must be a whole number in [1, 65535], got 99999")):
        app_module.run(None, ServeSettings(), port=99999)
    # a port in use or a host that is not there is said before the model loads (it loaded, said it
    # served there, and then uvicorn's own error ended it with exit status 3)
    with socket.socket() as taken, pytest.MonkeyPatch.context() as m:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m.setattr(default, "pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
        assert cli.main(["serve", "--port", str(port)]) == 2
        said = capsys.readouterr()
        assert f"cannot listen on 127.0.0.1:{port}" in said.err and "give another --port" in said.err
        assert "serving" not in said.out
        assert cli.main(["serve", "--host", "no.such.host.invalid"]) == 2
        assert "--host no.such.host.invalid: no address of that name" in capsys.readouterr().err
    # settings that would turn every call away (a body limit of 0) or make no sense are refused too
    # (before the model loads: the one named does not exist)
    # (by their options, as argparse refuses them: they had been named by the settings' fields)
    for option, value, said in (("--max-batch", "0", "argument --max-batch: 0 is out of range"),
                                ("--queue-limit", "-1", "argument --queue-limit: -1 is out of range"),
                                ("--timeout", "0", "argument --timeout: 0 is out of range"),
                                ("--max-body-mb", "0", "argument --max-body-mb: 0 is out of range"),
                                ("--batch-wait", "-1", "argument --batch-wait: -1 is out of range"),
                                ("--timeout", "nan", "argument --timeout: nan is out of range")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["serve", option, value, "--model", str(tmp_path / "no-model")])
        assert stop.value.code == 2 and said in capsys.readouterr().err, option
    # an option of the other batching was read by nothing
    for argv, said in ((["--slot-length", "100"], "--slot-length is for --batching continuous, not static"),
                       (["--batching", "continuous", "--chunk", "8"], "--chunk is for --batching static")):
        assert cli.main(["serve", *argv, "--model", str(tmp_path / "no-model")]) == 2, argv
        assert said in capsys.readouterr().err, argv
    # a slot longer than the model's positions, refused before the server says it serves
    assert cli.main(["serve", "--batching", "continuous", "--slot-length", "100000"]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"slot_length=100000: a slot holds 2 to the model's \d+ positions", err) and "serving" not in out
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "UNITOKEN_API_KEY": "from-the-environment", "JAX_PLATFORMS": "cpu"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "unitoken_jax.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            assert time.monotonic() < deadline, "unitoken serve did not start"
            try:
                if requests_http.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests_http.ConnectionError:
                time.sleep(0.2)
        _error(requests_http.get(url + "/v1/models"), 401, code="invalid_api_key")
        listed = requests_http.get(url + "/v1/models", headers={"Authorization": "Bearer from-the-environment"})
        assert [m["id"] for m in listed.json()["data"]] == [MODEL]
    finally:
        proc.terminate()
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
    printed = open(tmp_path / "serve.log").read()
    assert f"serving {MODEL} on http://127.0.0.1:{port}/v1 (API key required)" in printed
    assert "Application shutdown complete" in printed


# --- padding ---------------------------------------------------------------------------------------
def test_padding_brings_different_batches_to_a_few_shapes(pipe):
    """Batches of different mixes (prompt lengths, guided pictures, input pictures) meet the
    same bucketed shape; the requests keep their place at the front and their own settings."""
    engine = PipelineEngine(pipe, max_rows=32)
    picture = shapes.draw([Thing("red", "circle", "top left")])
    question = pipe.chat_request([{"from": "human", "value": "<|image|>\nWhat colour is the shape?"}], [picture],
                                 max_new_tokens=40)
    other = pipe.chat_request([{"from": "human", "value": "<|image|>\nWhere is the shape?"}], [picture],
                              max_new_tokens=50)
    drawing = pipe.generate_request("a red circle at the top left", size=(64, 64), cfg=3.0)
    assert len(question.tokens) != len(other.tokens)
    batches = [[question, drawing], [other, drawing], [question, other, other, drawing],
               [other, question, question, drawing]]
    padded = [engine.pad(b) for b in batches]
    found = {shape_of(p) for p in padded}
    assert len(found) == 2 and {s.rows for s in found} == {4, 8}, found
    for batch, p in zip(batches, padded):
        assert all(a.tokens is b.tokens and a.seed == b.seed for a, b in zip(batch, p))
        assert all(r.max_new_tokens == 1 for r in p[len(batch):])
        assert max(r.max_new_tokens for r in p) == 64
    assert engine.rows([question] * 9) == 16 and engine.rows([drawing] * 16) == 32


def test_a_batch_whose_prompt_bucket_is_the_whole_model_still_runs(pipe):
    """A prompt past half the model's positions rounds up to a bucket of all of them; the dummy
    that brings the batch to it leaves the model a position to answer in (`DecodeLoop` refuses a
    prompt that takes every position), and the answer is the one the call gets alone."""
    engine = PipelineEngine(pipe, max_rows=4)
    positions = pipe.model.config.decoder.max_position_embeddings
    picture = shapes.draw([Thing("red", "circle", "top left")])
    words = "What colour is the shape?"

    def ask(words):
        return [{"from": "human", "value": "<|image|>\n" + words}]

    while len(pipe.chat_request(ask(words), [picture]).tokens) <= positions // 2:
        words = "Look closely. " + words
    long = pipe.chat_request(ask(words), [picture], max_new_tokens=8)
    padded = engine.pad([long])
    assert shape_of(padded).prompt == positions - 1 and len(padded) == 2
    (batched,) = engine.run([long])
    alone = pipe.decode_loop.generate([long]).tokens[0]
    np.testing.assert_array_equal(batched.ids, alone)


# --- the queue, on cue -------------------------------------------------------------------------------
class GatedEngine:
    """Answers "ok" to every request once `gate` is set: the queue's behaviour without a model."""

    def __init__(self):
        self.gate = threading.Event()
        self.shapes_seen: set = set()

    def rows(self, requests):
        return sum(2 if r.cfg_scale != 1.0 else 1 for r in requests)

    def run(self, requests, progress=None):
        assert self.gate.wait(60)
        return [Output(ids=np.array([1, 2]), parts=["ok"], finish_reason="stop") for _ in requests]


@pytest.fixture
def gated(pipe, request):
    """A server of one-row batches and a one-call queue whose engine answers when its gate opens;
    `@pytest.mark.parametrize("gated", [seconds], indirect=True)` sets its timeout (default 60 s)."""
    engine = GatedEngine()
    settings = ServeSettings(model_name=MODEL, max_batch=1, queue_limit=1, timeout=getattr(request, "param", 60.0),
                             default_size=(64, 64), sizes=((64, 64),))
    running = _Running(create_app(pipe, settings, engine=engine))
    running.engine = engine
    yield running
    engine.gate.set()
    running.stop()


def _until(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What shape is this?"}]}


def test_a_full_queue_answers_429_then_serves(gated):
    answers = {}

    def call(name):
        answers[name] = requests_http.post(gated.url + "/v1/chat/completions", json=CHAT, timeout=60)

    first = threading.Thread(target=call, args=("running",))
    first.start()
    _until(lambda: gated.scheduler.rows_in_use == 1)
    second = threading.Thread(target=call, args=("waiting",))
    second.start()
    _until(lambda: gated.scheduler.queue_length == 1)
    with pytest.raises(openai.RateLimitError) as refused:
        gated.client().chat.completions.create(**CHAT)
    assert refused.value.body["code"] == "queue_full"
    gated.engine.gate.set()
    first.join(30)
    second.join(30)
    assert [answers[k].json()["choices"][0]["message"]["content"] for k in ("running", "waiting")] == ["ok", "ok"]


def test_a_call_whose_client_leaves_is_dropped_before_it_starts(gated):
    running = threading.Thread(target=requests_http.post, args=(gated.url + "/v1/chat/completions",),
                               kwargs={"json": CHAT, "timeout": 60})
    running.start()
    _until(lambda: gated.scheduler.rows_in_use == 1)
    body = requests_http.models.Request("POST", gated.url + "/v1/chat/completions", json=CHAT).prepare().body
    with socket.create_connection(("127.0.0.1", int(gated.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        _until(lambda: gated.scheduler.queue_length == 1)
    _until(lambda: gated.scheduler.cancelled == 1 and gated.scheduler.queue_length == 0)
    gated.engine.gate.set()
    running.join(30)


def _running_and_waiting(gated):
    """Two chat calls to the gated server, each in a thread: "running" holds its one-row batch and
    "waiting" is sent once it does. The answers land in the returned dict by name."""
    answers = {}

    def call(name):
        answers[name] = requests_http.post(gated.url + "/v1/chat/completions", json=CHAT, timeout=60)

    threads = [threading.Thread(target=call, args=(name,)) for name in ("running", "waiting")]
    threads[0].start()
    _until(lambda: gated.scheduler.rows_in_use == 1)
    threads[1].start()
    return answers, threads


def test_a_call_cut_off_by_a_shutdown_gets_503_not_a_timeout(gated):
    """A call still waiting when the server stops is answered 503 `shutting_down` (the client may
    retry elsewhere), not 504 as if it had run out of time; the running batch still finishes."""
    answers, threads = _running_and_waiting(gated)
    _until(lambda: gated.scheduler.queue_length == 1)
    gated.scheduler.stop(timeout=0.05)  # what the server's shutdown does, its batch still running
    threads[1].join(30)
    error = _error(answers["waiting"], 503, code="shutting_down")
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    gated.engine.gate.set()
    threads[0].join(30)
    assert answers["running"].json()["choices"][0]["message"]["content"] == "ok"


def test_a_server_told_to_exit_answers_its_waiting_call_503_before_it_closes_its_connections(gated, pipe):
    """What Ctrl-C does (uvicorn's signal handler sets `should_exit`): the server stops its
    scheduler before it closes its connections, so a call waiting in the queue gets 503
    `shutting_down` as OpenAI's error JSON. In uvicorn's own order (connections, then the app's
    lifespan) `unitoken serve` cut it after its graceful timeout: a plain-text 500, or a stream
    ended mid-way. A call submitted once the scheduler has stopped is refused the same way, not
    left waiting for a worker that takes no more batches."""
    answers, threads = _running_and_waiting(gated)
    _until(lambda: gated.scheduler.queue_length == 1)
    gated.server.should_exit = True
    threads[1].join(30)
    error = _error(answers["waiting"], 503, code="shutting_down")
    assert "shutting down" in error["message"]
    with pytest.raises(ShuttingDown):
        gated.scheduler.submit(Job([pipe.understand_request([], "hi")], on_finish=lambda out: None))
    gated.engine.gate.set()
    threads[0].join(30)


def test_a_static_batch_still_running_when_the_server_closes_its_connections_is_answered_503(pipe):
    """`unitoken serve` gave a running static batch uvicorn's graceful timeout (5 s) to finish, and
    then its calls got a plain-text 500 (a stream ended mid-way) and the log tracebacks: a picture
    of the release takes longer. Now they are answered 503 `shutting_down`, as OpenAI's error JSON,
    a second before the connections close."""
    engine = GatedEngine()  # (its gate never opens: the batch runs past the timeout)
    settings = ServeSettings(model_name=MODEL, max_batch=1, default_size=(64, 64), sizes=((64, 64),))
    running = _Running(create_app(pipe, settings, engine=engine), graceful=2.0)
    answers = {}

    def call():
        answers["running"] = requests_http.post(running.url + "/v1/chat/completions", json=CHAT, timeout=60)

    thread = threading.Thread(target=call)
    thread.start()
    _until(lambda: running.scheduler.rows_in_use == 1)
    started = time.monotonic()
    running.server.should_exit = True
    thread.join(30)
    error = _error(answers["running"], 503, code="shutting_down")
    assert "shutting down" in error["message"] and time.monotonic() - started < 10
    engine.gate.set()
    running.thread.join(30)


def test_a_continuous_chunk_still_running_when_the_server_closes_its_connections_is_answered_503(pipe):
    """The continuous worker told its running calls only when its chunk ended: a chunk that ran
    past uvicorn's graceful timeout (a first compile of a new shape, a long prefill) had them cut
    (a plain-text 500, a stream ended mid-way), as a static batch's were. They are answered 503
    `shutting_down` a second before the connections close."""
    settings = ServeSettings(model_name=MODEL, max_batch=2, batching="continuous", default_size=(64, 64),
                             sizes=((64, 64),))
    running = _Running(create_app(pipe, settings), graceful=2.0)
    decoder, gate = running.scheduler.decoder, threading.Event()
    real_step = decoder.step

    def held_step():  # a chunk that runs past the graceful timeout
        assert gate.wait(60)
        return real_step()

    decoder.step = held_step
    answers = {}

    def call():
        answers["running"] = requests_http.post(running.url + "/v1/chat/completions", json=CHAT, timeout=60)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        _until(lambda: running.scheduler.rows_in_use >= 1, 60)
        started = time.monotonic()
        running.server.should_exit = True
        thread.join(30)
        error = _error(answers["running"], 503, code="shutting_down")
        assert "shutting down" in error["message"] and time.monotonic() - started < 10
    finally:
        gate.set()
        thread.join(30)
        running.thread.join(30)


def test_a_continuous_server_s_gauges_fall_to_zero_when_its_calls_end(pipe):
    """`unitoken_rows_in_use` / `unitoken_batch_rows` were set when calls were admitted and never
    after the chunk that ended them: an idle server read as full to a monitor or an autoscaler."""
    settings = ServeSettings(model_name=MODEL, api_key=KEY, max_batch=4, batching="continuous",
                             default_size=(64, 64), sizes=((64, 64),))
    running = _Running(create_app(pipe, settings))
    try:
        client = running.client()
        for _ in range(2):
            client.chat.completions.create(model=MODEL, max_tokens=8,
                                           messages=[{"role": "user", "content": "What shape is red?"}])
        _until(lambda: _metric(running, "unitoken_queue_length") == 0, 10)
        time.sleep(0.5)
        assert _metric(running, "unitoken_rows_in_use") == 0 and _metric(running, "unitoken_batch_rows") == 0
    finally:
        running.stop()


def test_a_stream_its_client_closes_leaves_no_pending_task_behind(pipe, caplog):
    """Its progress task was cancelled only when the result came first: a stream closed by its
    client left one pending, logged as "Task was destroyed but it is pending!"."""
    import gc

    settings = ServeSettings(model_name=MODEL, api_key=KEY, max_batch=4, batching="continuous",
                             default_size=(64, 64), sizes=((64, 64),))
    running = _Running(create_app(pipe, settings))
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(6):
                with requests_http.post(running.url + "/v1/chat/completions", stream=True, timeout=60,
                                        headers={"Authorization": f"Bearer {KEY}"},
                                        json={"model": MODEL, "stream": True, "max_tokens": 400,
                                              "messages": [{"role": "user", "content": "Describe it."}]}) as r:
                    next(r.iter_lines())  # the role chunk, then the client goes away
            _until(lambda: _metric(running, "unitoken_queue_length") == 0, 30)
            for _ in range(20):  # later calls: the loop runs on, and collects what was left
                running.client().chat.completions.create(model=MODEL, max_tokens=2,
                                                         messages=[{"role": "user", "content": "Hi"}])
            gc.collect()
            time.sleep(0.5)
        assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    finally:
        running.stop()


def test_a_stop_while_a_batch_gathers_starts_no_batch(pipe):
    """A server stopping while its worker waits for more calls (`batch_wait`) tells the waiting
    call it is shutting down; the worker had gone on to run it as a new batch, which held up the
    shutdown for as long as that batch took."""
    engine, outcome = GatedEngine(), threading.Event()
    got = []
    scheduler = Scheduler(engine, max_rows=4, queue_limit=4, batch_wait=2.0)
    scheduler.start()
    scheduler.submit(Job([pipe.understand_request([], "hi")], on_finish=lambda out: (got.append(out), outcome.set())))
    time.sleep(0.2)  # gathering
    scheduler.stop(timeout=5.0)
    assert outcome.wait(1) and isinstance(got[0], ShuttingDown) and not scheduler.alive
    engine.gate.set()


@pytest.mark.parametrize("gated", [1.5], indirect=True)
def test_a_call_past_its_timeout_gets_504_and_leaves_the_queue(gated):
    answers, threads = _running_and_waiting(gated)
    for t in threads:
        t.join(30)
    for name in ("running", "waiting"):
        _error(answers[name], 504, code="timeout")
    assert gated.scheduler.queue_length == 0 and gated.scheduler.cancelled == 1
    gated.engine.gate.set()
    _until(lambda: gated.scheduler.rows_in_use == 0)
    assert requests_http.post(gated.url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200


def test_the_page_gets_the_drawing_prompt_filled_as_str_format_fills_it(server, monkeypatch):
    """The page filled {w}, {h} and {prompt} with a regular expression of its own: a doubled brace
    stayed doubled and a format spec was not filled. It now gets the template filled here, at its
    size, around the place of the prompt."""
    import json as json_lib

    monkeypatch.setattr(server.app.state.server.pipe, "generate_template", "Draw {{it}} {w}x{h}: {prompt!s}.")
    html = requests_http.get(server.url + "/", timeout=60).text
    (parts,) = re.findall(r"const TEMPLATE = (\[.*?\]);", html)
    assert json_lib.loads(parts) == ["Draw {it} 64x64: ", "."]
    assert "a cat".join(json_lib.loads(parts)) == "Draw {{it}} {w}x{h}: {prompt!s}.".format(w=64, h=64, prompt="a cat")


def test_a_size_the_model_cannot_hold_is_the_sizes_fault_and_a_phones_photo_is_taken(pipe):
    """An image call with no size, on a server of a model that records no trained size (a user's own
    files) and cannot hold its default 512x512: the 400 named `prompt` ("shorten the prompt"). A
    5000x4000 photo (a phone's 20 megapixels) was refused as "a decompression bomb?" (the server's
    own 4096 x 4096 limit, said nowhere), and a picture over 8 MB was said to be 8388609 bytes long
    (as far as the server read it)."""
    import copy

    from unitoken_jax.serve import wire

    own = copy.copy(pipe)
    own.trained_sizes = None
    running = _Running(create_app(own, ServeSettings(model_name=MODEL, default_size=(512, 512))))
    try:
        error = _error(requests_http.post(running.url + "/v1/images/generations",
                                          json={"model": MODEL, "prompt": "a red circle"}), 400, "size",
                       "context_length_exceeded")
        assert "a 512x512 picture" in error["message"] and "ask for a smaller size: " in error["message"], error
    finally:
        running.stop()
    photo = io.BytesIO()
    Image.new("RGB", (5000, 4000), (200, 30, 30)).save(photo, "PNG")
    assert wire.read_picture(photo.getvalue(), "image", Limits()).size == (5000, 4000)
    limits = Limits(max_image_bytes=1000)
    with pytest.raises(wire.APIError) as refused:
        wire.read_picture(photo.getvalue()[:1001], "image", limits)
    assert "the picture is more than 1000 bytes, this server's limit" in refused.value.message


def test_a_call_too_big_for_a_continuous_servers_batch_or_slots_names_the_field_that_makes_it_so(pipe):
    """On `--max-batch 1`, a guided picture (n=1: the images endpoint guides by default) was refused
    as a bad `n`, with no code and static batching's padding in its words; a picture too long for
    `--slot-length` named no field at all (a chat's names its messages or max_tokens)."""
    draw = {"model": MODEL, "prompt": "a red circle at the top left", "size": SIZE}
    for slot_length, body, field, code, said in (
            (64, {**draw, "guidance_scale": 3}, "guidance_scale", "exceeds_max_batch", "needs 2 batch rows"),
            (40, {**draw, "guidance_scale": 1}, "size", "context_length_exceeded",
             "do not fit this server's slots of 40 positions")):
        settings = ServeSettings(model_name=MODEL, max_batch=1, default_size=(64, 64), sizes=((64, 64),),
                                 batching="continuous", slot_length=slot_length)
        running = _Running(create_app(pipe, settings))
        try:
            error = _error(requests_http.post(running.url + "/v1/images/generations", json=body), 400, field, code)
            assert said in error["message"] and "static" not in error["message"], error
            if slot_length == 64:  # a text-only answer draws nothing to guide: one row (it was refused too)
                question = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "modalities": ["text"], "guidance_scale": 3}
                answer = requests_http.post(running.url + "/v1/chat/completions", json=question)
                assert answer.status_code == 200, answer.text
        finally:
            running.stop()
