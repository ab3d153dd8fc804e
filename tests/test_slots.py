"""Continuous batching (`inference.slots.SlotDecoder`): requests admitted into free slots between
chunks, while others run, give exactly the tokens they give alone with the same seeds; a guided
picture takes two slots; slots free up and are reused; a request that cannot fit is refused; a
chunk or a prefill that fails frees what it must and the decoder goes on."""

import functools

import jax
import numpy as np
import pytest

from unitoken_jax.inference.slots import SlotDecoder
from unitoken_jax.world import default, shapes


@pytest.fixture(scope="module")
def pipe():
    return default.pipeline()


def _requests(pipe, tmp_path):
    pictures = []
    for i, thing in enumerate(shapes.held_out_things()[:3]):
        path = str(tmp_path / f"{i}.png")
        shapes.draw([thing], np.random.default_rng(i)).save(path)
        pictures.append(path)
    return {
        "colour": pipe.understand_request([pictures[0]], shapes.QUESTIONS["colour"], max_new_tokens=8),
        "caption": pipe.understand_request([pictures[1]], shapes.QUESTIONS["caption"], max_new_tokens=24),
        "sampled": pipe.understand_request([pictures[2]], shapes.QUESTIONS["place"], max_new_tokens=8,
                                           temperature=0.9, top_k=20, seed=5),
        "guided": pipe.generate_request("a red circle at the top left", size=(64, 64), cfg=3.0, seed=2),
        "plain": pipe.generate_request("a blue square at the bottom right", size=(64, 64), cfg=1.0, seed=3),
        "guided2": pipe.generate_request("a yellow triangle at the bottom left", size=(64, 64), cfg=3.0, seed=4),
    }


def test_requests_admitted_mid_run_equal_their_runs_alone_and_slots_are_reused(pipe, tmp_path):
    requests = _requests(pipe, tmp_path)
    alone = {name: pipe.decode_loop.generate([r]).tokens[0] for name, r in requests.items()}
    decoder = SlotDecoder(pipe.decode_loop, slots=4, length=128, chunk=4)
    names = list(requests)
    got, admitted_late = {}, []
    decoder.admit(names[0], requests[names[0]])
    decoder.admit(names[3], requests[names[3]])  # a guided picture: two slots
    assert decoder.free_slots == 1
    waiting = [n for n in names if n not in decoder.running]
    while decoder.busy or waiting:
        while waiting and decoder.slots_needed(requests[waiting[0]]) <= decoder.free_slots:
            name = waiting.pop(0)
            if any(decoder.partial(n).size for n in decoder.running):
                admitted_late.append(name)  # joined while others were part-way through
            decoder.admit(name, requests[name])
        got.update(decoder.step())
    assert admitted_late, "the schedule never admitted a request mid-run"
    assert set(got) == set(requests)
    for name in requests:
        np.testing.assert_array_equal(got[name], alone[name], err_msg=name)
    assert decoder.free_slots == 4 and not decoder.busy

    # two slots for six requests: every slot is reused, a guided picture waits for two free ones
    decoder = SlotDecoder(pipe.decode_loop, slots=2, length=128, chunk=8)
    out = decoder.run_all(requests)
    for name in requests:
        np.testing.assert_array_equal(out[name], alone[name], err_msg=name)
    with pytest.raises(ValueError, match="do not fit a slot of 128 positions"):
        decoder.admit("long", pipe.understand_request([], "What colour is the shape?", max_new_tokens=500))
    one = SlotDecoder(pipe.decode_loop, slots=1, length=128)
    with pytest.raises(ValueError, match="need 2 free slot"):
        one.admit("guided", requests["guided"])
    decoder.admit("x", requests["colour"])
    decoder.cancel("x")
    assert decoder.free_slots == 2 and not decoder.busy


def test_a_slot_stops_and_refuses_where_a_generation_alone_does(pipe):
    """A slot longer than the model's positions let a row decode past the model's last position
    (more tokens than alone, at positions the model never saw), and a picture whose budget cannot
    hold it was drawn cut short where `generate` refuses it."""
    from unitoken_jax.inference.decode import Request

    positions = pipe.decode_loop.config.decoder.max_position_embeddings
    tokens = np.random.default_rng(0).integers(10, 4000, size=positions - 8).astype(np.int32)
    near_the_end = Request(tokens, max_new_tokens=40, stop_tokens=())
    alone = pipe.decode_loop.generate([near_the_end]).tokens[0]
    assert len(alone) == 8
    decoder = SlotDecoder(pipe.decode_loop, slots=2, length=positions + 64, chunk=16)
    np.testing.assert_array_equal(decoder.run_all({"end": near_the_end})["end"], alone)
    short = pipe.generate_request("a red circle at the top left", size=(64, 64), max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens=5 cannot hold a 64x64 image"):
        pipe.decode_loop.generate([short])
    with pytest.raises(ValueError, match="max_new_tokens=5 cannot hold a 64x64 image"):
        decoder.admit("short", short)
    assert decoder.free_slots == 2


def test_a_conversations_next_turn_continues_in_the_slot_that_holds_it(pipe):
    """A free slot keeps what its last request left in the cache. A chat's next turn (the history
    sent again, as an OpenAI client does), admitted while another request runs, goes into the slot
    that holds the conversation and computes only its new positions; it samples what it samples
    alone. A request that shares only the template's first tokens takes an empty slot instead."""
    from unitoken_jax.tokenizer.conversation import decode

    picture = shapes.draw([shapes.Thing("green", "square", "bottom right")])
    decoder = SlotDecoder(pipe.decode_loop, slots=3, length=256, chunk=4)
    messages = [{"from": "human", "value": "<|image|>\nWhat colour is the shape?"}]
    first = pipe.chat_request(messages, [picture], max_new_tokens=16, temperature=0.9, seed=1)
    answer = decoder.run_all({"first": first})["first"]
    np.testing.assert_array_equal(answer, pipe.decode_loop.generate([first]).tokens[0])
    (held,) = decoder._held
    assert decoder.reused_positions == 0

    other = pipe.understand_request([], shapes.QUESTIONS["caption"], max_new_tokens=12)
    assert decoder.admit("other", other) != [held]
    text = "".join(p for p in decode(answer, pipe.tokenizer, pipe.vq, repair=True) if isinstance(p, str))
    messages += [{"from": "gpt", "value": text}, {"from": "human", "value": "Where is the shape?"}]
    second = pipe.chat_request(messages, [picture], max_new_tokens=16, temperature=0.9, seed=2)
    decoder.step()  # "other" part-way through
    assert decoder.admit("second", second) == [held]
    # the first turn's prompt and the answer's ids but the last (the row ended when it drew it: it
    # was never fed back), as far as the second prompt repeats them
    kept = np.concatenate([first.tokens, answer[:-1]])
    shared = np.cumprod(kept[:len(second.tokens) - 1] == second.tokens[:len(kept)][:len(second.tokens) - 1]).sum()
    assert decoder.reused_positions == shared > len(first.tokens)
    out = {}
    while decoder.busy:
        out.update(decoder.step())
    for name, request in (("other", other), ("second", second)):
        np.testing.assert_array_equal(out[name], pipe.decode_loop.generate([request]).tokens[0], err_msg=name)

    # a guided turn that asks for a drawing (the model draws one) continues there too; its partner row
    # is prefilled apart
    text = "".join(p for p in decode(out["second"], pipe.tokenizer, pipe.vq, repair=True) if isinstance(p, str))
    messages += [{"from": "gpt", "value": text}, {"from": "human", "value": "Draw a red circle at the top left"}]
    third = pipe.chat_request(messages, [picture], max_new_tokens=64, cfg=3.0, seed=3)
    reused = decoder.reused_positions
    slots = decoder.admit("third", third)
    assert slots[0] == held and len(slots) == 2 and decoder.reused_positions > reused
    out = {}
    while decoder.busy:
        out.update(decoder.step())
    np.testing.assert_array_equal(out["third"], pipe.decode_loop.generate([third]).tokens[0])


def test_a_request_that_continues_no_kept_cache_takes_the_one_kept_longest_ago(pipe):
    """With every free slot holding a kept cache, a new request took the lowest-numbered one: the
    conversation that had just gone on there lost its cache, and its next turn was computed whole."""
    a_picture = shapes.draw([shapes.Thing("green", "square", "bottom right")])
    b_picture = shapes.draw([shapes.Thing("red", "circle", "top left")])
    decoder = SlotDecoder(pipe.decode_loop, slots=2, length=256, chunk=4)
    question = [{"from": "human", "value": "<|image|>\nWhat colour is the shape?"}]
    a1 = pipe.chat_request(question, [a_picture], max_new_tokens=8)
    assert decoder.admit("a1", a1) == [0]
    decoder.run_all({})
    b1 = pipe.chat_request(question, [b_picture], max_new_tokens=8)
    assert decoder.admit("b1", b1) == [1]  # (an empty slot first)
    decoder.run_all({})
    # A's next turn continues slot 0 (its prompt and picture are kept there, whatever the answer was): its
    # cache is now the one kept last, B's the one kept longest ago
    history = question + [{"from": "gpt", "value": "green"}, {"from": "human", "value": "Where is the shape?"}]
    a2 = pipe.chat_request(history, [a_picture], max_new_tokens=8)
    reused = decoder.reused_positions
    assert decoder.admit("a2", a2) == [0] and decoder.reused_positions > reused
    decoder.run_all({})
    other = pipe.understand_request([], shapes.QUESTIONS["caption"], max_new_tokens=4)
    assert decoder.admit("other", other) == [1]
    decoder.run_all({})
    # and A's third turn still finds its cache
    history += [{"from": "gpt", "value": "bottom right"}, {"from": "human", "value": "What shape is this?"}]
    reused = decoder.reused_positions
    assert decoder.admit("a3", pipe.chat_request(history, [a_picture], max_new_tokens=8)) == [0]
    assert decoder.reused_positions > reused


def test_a_chat_answer_that_draws_is_guided_from_its_own_break(pipe):
    """A guided chat request's partner starts where the answer's picture does: the picture equals
    the one drawn by a guided request whose prompt is the chat prompt plus the answer up to its
    <racm3:break> (greedy codes, so the seeds' keys do not matter), alone and in the slot decoder;
    the guidance changes the picture (an unguided answer draws another one)."""
    from unitoken_jax.inference.decode import Request
    from unitoken_jax.tokenizer import layout

    text = pipe.generate_template.format(w=64, h=64, prompt="a green square at the top right")  # as the web page
    ask = lambda cfg: pipe.chat_request([{"from": "human", "value": text}], cfg=cfg,  # noqa: E731
                                        image_temperature=0.0, max_new_tokens=120, stop_after_image=True)
    guided = pipe.decode_loop.generate([ask(3.0)]).tokens[0]
    start = list(guided).index(layout.IMAGE_START)  # the answer draws (after `start` tokens of text)
    assert len(guided) > start + 20
    prompt = np.concatenate([ask(3.0).tokens, guided[:start + 1]])
    continued = pipe.decode_loop.generate([Request(prompt, max_new_tokens=len(guided) - start - 1, cfg_scale=3.0,
                                                   image_temperature=0.0, stop_after_image=True)]).tokens[0]
    np.testing.assert_array_equal(guided[start + 1:], continued)
    unguided = pipe.decode_loop.generate([ask(1.0)]).tokens[0]
    assert not np.array_equal(unguided, guided)
    # an answer that never draws is the same text guided or not (its partner only ever waits)
    say = lambda cfg: pipe.chat_request([{"from": "human", "value": "Say hello."}], cfg=cfg,  # noqa: E731
                                        max_new_tokens=12)
    plain_text, guided_text = pipe.decode_loop.generate([say(1.0), say(3.0)]).tokens
    assert layout.IMAGE_START not in plain_text
    np.testing.assert_array_equal(guided_text, plain_text)
    # beside other requests in the slot decoder: the same tokens
    others = {"q": pipe.chat_request([{"from": "human", "value": "Say hello."}], max_new_tokens=6),
              "chat": ask(3.0)}
    out = SlotDecoder(pipe.decode_loop, slots=4, length=256, chunk=4).run_all(others)
    np.testing.assert_array_equal(out["chat"], guided)


def _device_fault():
    raise RuntimeError("simulated device fault")


@functools.partial(jax.jit, donate_argnums=(0,))
def _consume(state):
    """A run that fails on the device after it took (was donated) the state."""
    jax.debug.callback(_device_fault)
    return jax.tree.map(lambda x: x + 0 if x.dtype != bool else x, state)


def test_a_failed_chunk_or_prefill_frees_slots_and_the_decoder_goes_on(pipe, monkeypatch):
    """A chunk that fails on the device, with the state the loop was donated gone, raises; every
    running request leaves its slots and the next one decodes as alone. A prefill that fails admits
    none of its requests and the running ones go on to what they give alone."""
    loop = pipe.decode_loop
    colour = pipe.understand_request([], shapes.QUESTIONS["colour"], max_new_tokens=8)
    place = pipe.understand_request([], shapes.QUESTIONS["place"], max_new_tokens=8)
    alone = {name: loop.generate([r]).tokens[0] for name, r in (("colour", colour), ("place", place))}
    decoder = SlotDecoder(loop, slots=4, length=128, chunk=4)
    decoder.admit("a", colour)
    decoder.admit("b", place)
    with monkeypatch.context() as m:
        m.setattr(loop, "_run", lambda params, state, *rest: _consume(state))
        with pytest.raises(Exception, match="simulated device fault"):
            decoder.step()
    assert not decoder.busy and decoder.free_slots == 4
    np.testing.assert_array_equal(decoder.run_all({"c": colour})["c"], alone["colour"])

    caption = pipe.understand_request([], shapes.QUESTIONS["caption"], max_new_tokens=24, stop_tokens=())
    decoder.admit("a", caption)
    assert decoder.step() == {}  # part-way through

    def no_memory(*args):
        raise MemoryError("simulated: the prefill does not fit")

    with monkeypatch.context() as m:
        m.setattr(loop, "_prefill", no_memory)
        with pytest.raises(MemoryError):
            decoder.admit_many({"b": place, "g": pipe.generate_request("a red circle", size=(64, 64), cfg=3.0)})
    assert list(decoder.running) == ["a"] and decoder.free_slots == 3
    out = decoder.run_all({"b": place})
    np.testing.assert_array_equal(out["a"], loop.generate([caption]).tokens[0])
    np.testing.assert_array_equal(out["b"], alone["place"])


def test_a_chat_answer_cut_before_its_pictures_size_is_its_text_and_a_warning(pipe):
    """The bundled model answers a drawing request with <racm3:break> at once; a budget that ends
    before both size tokens leaves no picture to complete: the answer is its (empty) text and a
    `PictureRepaired` warning, not a MalformedImageTokens out of `chat`."""
    from unitoken_jax.inference.pipeline import PictureRepaired

    text = pipe.generate_template.format(w=64, h=64, prompt="a green square at the top right")
    for budget in (1, 2):
        with pytest.warns(PictureRepaired, match=f"the picture it started was cut off after {budget} of its ids, "
                                                 "before its size: dropped"):
            assert pipe.chat([{"from": "human", "value": text}], max_new_tokens=budget) == []
