"""The compiled decode loop and the pipelines: batching, classifier-free guidance, the grid,
and greedy parity with transformers' generate."""

import dataclasses
import gc
import importlib.metadata
import os
import time
import re
import weakref

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import oracles
import tokenizer_fixture
import unitoken_jax
from unitoken_jax.configs.model import get_config
from unitoken_jax.convert.vqgan import save_vqgan
from unitoken_jax.inference import decode, grid
from unitoken_jax.inference.decode import DecodeLoop, Request, prefill_width
from unitoken_jax.models.chameleon import cache_length
from unitoken_jax.inference.pipeline import UniTokenPipeline
from unitoken_jax.models.vqgan import VQGANConfig
from unitoken_jax.tokenizer import layout
from unitoken_jax.tokenizer.text import TextTokenizer
from unitoken_jax.vq_tokenizer import VQTokenizer



@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, vocab_size=9216))  # holds the test tokenizer
    model = unitoken_jax.UniTokenModel.random(cfg, seed=0)
    # a random VQ-GAN with all 8192 codes (the VQ-GAN's own parity tests are in test_vqgan.py)
    vq = VQTokenizer.random(VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=8,
                                        n_embed=8192), seed=1)
    images = tmp_path_factory.mktemp("images")
    Image.fromarray(skdata.chelsea()).save(images / "cat.png")
    Image.fromarray(skdata.coffee()).save(images / "coffee.png")
    p = UniTokenPipeline(model, TextTokenizer(tokenizer_fixture.build()), vq, vq_size=32, image_prefix=())
    p.image_dir = images
    return p


@pytest.fixture
def fresh_programs():
    """For tests that count compiles: decode loops of one config share their compiled programs in
    a process (`decode._steps`), so a test's first loop would find its shapes already compiled by
    an earlier test's."""
    decode._steps.cache_clear()


def _compiles_during(fn):
    """(fn's result, the XLA compiles it ran)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return fn(), len(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _requests(pipe):
    cat, coffee = str(pipe.image_dir / "cat.png"), str(pipe.image_dir / "coffee.png")
    return [
        pipe.understand_request([cat], "the cat is", max_new_tokens=6, temperature=0.8, top_k=50, seed=1),
        pipe.generate_request("he is the", size=(64, 32), cfg=3.0, seed=2, image_top_k=100),
        pipe.generate_request("or", size=(32, 64), cfg=1.0, seed=3, image_top_p=0.8, image_top_k=0),
        pipe.edit_request(coffee, "the", size=(32, 32), cfg=2.0, seed=4, negative_prompt="or not"),
        pipe.chat_request([{"from": "human", "value": "<|image|> and <|image|> then"}], [cat, coffee],
                          max_new_tokens=5, temperature=1.0, seed=5),
    ]


def test_a_batch_equals_single_runs_with_the_same_seeds(pipe):
    requests = _requests(pipe)
    batched = pipe.decode_loop.generate(requests).tokens
    for request, tokens in zip(requests, batched):
        alone = pipe.decode_loop.generate([request]).tokens[0]
        np.testing.assert_array_equal(tokens, alone)
    assert len({len(t) for t in batched}) > 1  # rows of different lengths finished separately


def test_a_second_model_of_the_same_config_reuses_the_compiled_programs_with_its_own_weights(pipe, fresh_programs):
    """A second decode loop for a model of the same config (another checkpoint, a fine-tuned copy,
    the same one loaded again) compiles nothing: it runs the first one's programs on its own
    parameters, and those programs keep no model alive."""
    config, requests = pipe.model.config, _requests(pipe)
    first = DecodeLoop(config, unitoken_jax.UniTokenModel.random(config, seed=11).params)
    drawn_first = first.generate(requests).tokens
    held = weakref.ref(jax.tree.leaves(first.params)[0])
    weights = unitoken_jax.UniTokenModel.random(config, seed=12).params
    second = DecodeLoop(config, weights)
    drawn, compiles = _compiles_during(lambda: second.generate(requests).tokens)
    assert compiles == 0
    del first
    gc.collect()
    assert held() is None  # the shared programs hold none of the first model's arrays
    decode._steps.cache_clear()  # the second model's own programs, compiled afresh, draw the same
    alone = DecodeLoop(config, weights).generate(requests).tokens
    for a, b in zip(drawn, alone):
        np.testing.assert_array_equal(a, b)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(drawn, drawn_first))  # the weights matter


@pytest.mark.parametrize("grid_hw", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_the_grid_always_gives_h_rows_of_w_codes_and_the_end(pipe, grid_hw):
    req = pipe.generate_request("the", size=(32 * grid_hw[1], 32 * grid_hw[0]), cfg=2.0, seed=sum(grid_hw),
                                image_top_k=0, image_temperature=1.5)
    (tokens,) = pipe.decode_loop.generate([req]).tokens
    h, w = 2 * grid_hw[0], 2 * grid_hw[1]
    assert len(tokens) == 2 + h * (w + 1) + 1
    parsed = layout.parse_image_ids([layout.IMAGE_START] + tokens.tolist())  # strict: raises if malformed
    assert parsed.code_ids.shape == (h, w) and not parsed.repairs


def _oracle_cfg_greedy(model, cond, uncond, scale, grid_hw):
    """Per-row CFG written out step by step with full forwards (no cache, no batching), the way
    the reference's processors define it: guidance inside the image body, the grid forced."""
    h, w = 2 * grid_hw[0], 2 * grid_hw[1]
    cond, uncond = list(cond), list(uncond)
    out = []
    for step in range(2 + h * (w + 1) + 1):
        c = np.asarray(model.text_logits(np.array([cond])))[0, -1]
        u = np.asarray(model.text_logits(np.array([uncond])))[0, -1]
        if step < 2:
            tok = layout.GRID_BASE + grid_hw[step]
        elif step == 2 + h * (w + 1):
            tok = layout.IMAGE_END
        elif (step - 2) % (w + 1) == w:
            tok = layout.NEWLINE
        else:
            guided = u + scale * (c - u)
            allowed = np.full_like(guided, -np.inf)
            allowed[4:8196] = guided[4:8196]
            tok = int(np.argmax(allowed))
        out.append(tok)
        cond.append(tok)
        uncond.append(tok)
    return out


def test_batched_cfg_equals_per_row_cfg(pipe):
    model = pipe.model
    # greedy codes; the requests' text temperature (hot here) must not touch image rows (set on the
    # requests: the pipeline reads a picture request's `temperature` as its codes')
    requests = [dataclasses.replace(pipe.generate_request("he", size=(64, 32), cfg=3.0, image_temperature=0.0),
                                    temperature=100.0),
                dataclasses.replace(pipe.generate_request("the or", size=(32, 32), cfg=1.5, image_temperature=0.0,
                                                          negative_prompt="not"), temperature=100.0)]
    batched = pipe.decode_loop.generate(requests).tokens
    for request, tokens in zip(requests, batched):
        expected = _oracle_cfg_greedy(model, request.tokens, request.uncond_tokens, request.cfg_scale, request.grid_hw)
        assert tokens.tolist() == expected


def test_every_picture_a_guided_answer_draws_is_guided_from_its_own_break(pipe):
    """The reference's CFG starts its unconditional context again at each <racm3:break>, so a
    guided answer that draws several pictures guides each one alone. With every text id but
    <racm3:break> banned, a guided chat answer draws picture after picture; each equals the
    picture a guided request draws whose prompt is the chat prompt plus the answer up to that
    picture's <racm3:break> (greedy codes), which guidance changes. The slot decoder, with another
    request beside it, gives the same answer."""
    from unitoken_jax.inference.slots import SlotDecoder

    model = pipe.model
    ids = np.arange(model.config.decoder.vocab_size)
    loop = DecodeLoop(model.config, model.params, banned_ids=ids[~layout.is_image_id(ids, np)])
    picture = dict(grid_hw=(1, 1), image_temperature=0.0)  # <racm3:break>, 2 sizes, 2 x 3 body, <eoss>
    chat = pipe.chat_request([{"from": "human", "value": "the or"}], cfg=3.0, size=(32, 32), max_new_tokens=30,
                             image_temperature=0.0)
    answer = loop.generate([chat]).tokens[0]
    starts = np.flatnonzero(answer == layout.IMAGE_START)
    assert starts.tolist() == [0, 10, 20], answer
    for start in starts:
        prompt = np.concatenate([chat.tokens, answer[:start + 1]])
        alone = [loop.generate([Request(prompt, max_new_tokens=9, cfg_scale=cfg, stop_after_image=True,
                                        **picture)]).tokens[0] for cfg in (3.0, 1.0)]
        np.testing.assert_array_equal(answer[start + 1:start + 10], alone[0], err_msg=f"picture at {start}")
        assert not np.array_equal(alone[0], alone[1]), "guidance changed nothing: the test cannot tell"
    other = pipe.chat_request([{"from": "human", "value": "he is"}], max_new_tokens=6)
    out = SlotDecoder(loop, slots=4, length=128, chunk=4).run_all({"q": other, "chat": chat})
    np.testing.assert_array_equal(out["chat"], answer)


def test_scanned_and_unrolled_layers_decode_the_same_tokens(pipe):
    """The two layer layouts run the same arithmetic: a batch of questions about pictures, guided
    pictures, an edit and a chat decodes the same tokens, and so does a batch of pictures only
    (whose steps compute the image-code logits alone: from the unrolled copy's own code kernel).
    Scanned, the attention reads the stacked cache in blocks, the filled ones only (a CPU's
    default), or every slot at once: the same tokens too, with blocks of 40 slots (these caches
    are a few hundred long: several blocks, the last one ragged)."""
    scanned = DecodeLoop(pipe.model.config, pipe.model.params, layers="scan")
    assert scanned.cache_block == decode.CPU_CACHE_BLOCK
    blocks = DecodeLoop(pipe.model.config, pipe.model.params, layers="scan", cache_block=40)
    whole = DecodeLoop(pipe.model.config, pipe.model.params, layers="scan", cache_block=0)
    unrolled = DecodeLoop(pipe.model.config, pipe.model.params, layers="unrolled")
    assert unrolled.layers == "unrolled" and "layers" in scanned.params["decoder"]
    assert "layers_0" in unrolled.params["decoder"] and "prefix_kernel" in unrolled.params["decoder"]["lm_head"]
    pictures = [pipe.generate_request(p, size=(64, 64), cfg=3.0, seed=i) for i, p in enumerate(["he", "the or"])]
    for requests in (_requests(pipe), pictures):
        want = unrolled.generate(requests).tokens
        for loop in (scanned, blocks, whole):
            for a, b in zip(loop.generate(requests).tokens, want):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="'auto', 'scan' or 'unrolled'"):
        DecodeLoop(pipe.model.config, pipe.model.params, layers="stacked")
    for bad in (-1, 1.5, True, "128"):
        with pytest.raises(ValueError, match="cache_block=.*0 = read every slot"):
            DecodeLoop(pipe.model.config, pipe.model.params, layers="scan", cache_block=bad)


def test_the_default_growth_takes_no_more_sizes_than_doubling_and_reads_fewer_slots():
    """Against doubling from 256 (what the unrolled loop did before, written out here): over
    chunk ends of 64 steps, never more cache sizes (compiles), every chunk's end held, the last
    size the full length, and fewer slots read over a 512 x 512 picture's decoding."""
    from unitoken_jax.inference.decode import default_growth

    def doubling(need, full):
        return min(full, max(256, 1 << (need - 1).bit_length()))

    for prompt in (1, 24, 100, 200, 255, 300, 700, 1500):
        for new in (1, 32, 64, 65, 256, 300, 1059, 2115, 4000):
            full, ends = prompt + new, [prompt + min(e, new) for e in range(64, new + 64, 64)]
            step = default_growth(ends[0], full)
            ours = [min(full, -(-need // step) * step) for need in ends]
            assert all(c >= need for c, need in zip(ours, ends)) and ours[-1] == full
            assert len(set(ours)) <= len({doubling(need, full) for need in ends}), (prompt, new)
    # the benchmark's picture: 24 prompt positions, 1,059 generated; sizes 272, 544, 816, 1,083
    prompt, new = 24, 1059
    ends = [prompt + min(e, new) for e in range(64, new + 64, 64)]
    step = default_growth(ends[0], prompt + new)
    assert step == 272

    def slots_read(size):  # each step of a chunk reads the whole cache the chunk runs with
        return sum(size(need) * (need - start) for start, need in zip([prompt] + ends, ends))

    ours = slots_read(lambda need: min(prompt + new, -(-need // step) * step))
    assert ours < 0.95 * slots_read(lambda need: doubling(need, prompt + new))


def test_an_unrolled_loops_cache_grows_as_its_rows_do(pipe):
    """Unrolled, the cache starts small and grows as the rows pass its end (between chunks; never
    past the full length), keeping what it holds: a 300-token answer beside a guided picture
    decodes the same tokens as the scanned loop, whose cache is full-length from the start."""
    cat = str(pipe.image_dir / "cat.png")
    long_answer = dataclasses.replace(
        pipe.understand_request([cat], "the cat is", max_new_tokens=300, temperature=0.9, seed=1), stop_tokens=())
    requests = [long_answer, pipe.generate_request("he is", size=(64, 32), cfg=3.0, seed=2)]
    scanned = DecodeLoop(pipe.model.config, pipe.model.params, layers="scan")
    unrolled = DecodeLoop(pipe.model.config, pipe.model.params, layers="unrolled")
    grown = []
    grow = unrolled._grow
    unrolled.__dict__["_grow"] = lambda cache, length: grown.append(length) or grow(cache, length)
    prompt = -(-max(len(r.tokens) for r in requests) // 32) * 32  # the prefill's width: a multiple of 32
    # doubling would take two sizes (256, then the full length): the default takes two, evenly spaced
    assert prompt + 64 <= 256 < prompt + 300 < 512 and prompt + 64 <= (prompt + 300) / 2
    a, b = scanned.generate(requests, chunk=64).tokens, unrolled.generate(requests, chunk=64).tokens
    assert grown == [prompt + 300] and len(a[0]) == len(b[0]) == 300
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # grown 96 slots at a time instead: a multiple of 96 that holds each chunk's end, then the full length
    stepped = DecodeLoop(pipe.model.config, pipe.model.params, layers="unrolled", cache_growth=96)
    grown.clear()
    grow96 = stepped._grow
    stepped.__dict__["_grow"] = lambda cache, length: grown.append(length) or grow96(cache, length)
    c = stepped.generate(requests, chunk=64).tokens
    ends = [min(prompt + 300, -(-(prompt + min(e, 300)) // 96) * 96) for e in range(128, 320 + 1, 64)]
    assert grown == sorted(set(ends) - {-(-(prompt + 64) // 96) * 96}) and grown[-1] == prompt + 300
    for x, y in zip(a, c):
        np.testing.assert_array_equal(x, y)
    for bad in (0, -96, 1.5, "96", True):
        with pytest.raises(ValueError, match="cache_growth"):
            DecodeLoop(pipe.model.config, pipe.model.params, layers="unrolled", cache_growth=bad)
    # scanned layers keep one full-length cache: a growth there was taken and did nothing
    with pytest.raises(ValueError, match="cache_growth=96 acts on unrolled layers only"):
        DecodeLoop(pipe.model.config, pipe.model.params, layers="scan", cache_growth=96)


def test_prompts_a_few_tokens_apart_share_one_compiled_prefill_and_loop(pipe, fresh_programs):
    """The prefill's width is padded up to a multiple of `prompt_multiple`: prompts within one
    multiple compile nothing new, and draw the tokens they draw unpadded (sampled text, a guided
    picture); a width in the next multiple compiles again."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    def request(words, seed):
        return [pipe.generate_request(words, size=(32, 32), cfg=3.0, seed=seed, image_top_k=100),
                pipe.understand_request([str(pipe.image_dir / "cat.png")], words, max_new_tokens=6,
                                        temperature=0.9, seed=seed)]

    loop = DecodeLoop(pipe.model.config, pipe.model.params)  # default: 32
    plain = DecodeLoop(pipe.model.config, pipe.model.params, prompt_multiple=1)
    short, longer, next_multiple = request("he", 1), request("he is the cat", 2), None
    width = max(len(r.tokens) for r in short)
    assert width % 32 and max(len(r.tokens) for r in longer) > width  # both pad to the same multiple
    assert -(-width // 32) == -(-max(len(r.tokens) for r in longer) // 32)
    words = "he"
    while next_multiple is None or -(-max(len(r.tokens) for r in next_multiple) // 32) == -(-width // 32):
        words += " is the cat"
        next_multiple = request(words, 3)
    loop.generate(short)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        padded = loop.generate(longer).tokens
        assert compiles == []  # the same prefill and loop as `short`'s
        loop.generate(next_multiple)
        assert len(compiles) >= 2  # a wider prefill and its loop
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    for a, b in zip(padded, plain.generate(longer).tokens):
        np.testing.assert_array_equal(a, b)
    assert len(padded[0]) == layout.generated_image_length((1, 1)) - 1 and len(padded[1]) > 0
    for bad in (0, -32, 1.5, "32", True):
        with pytest.raises(ValueError, match="prompt_multiple"):
            DecodeLoop(pipe.model.config, pipe.model.params, prompt_multiple=bad)


def test_rows_stop_at_the_models_last_position_and_a_chats_turns_share_the_loop(pipe, fresh_programs):
    """A row stopped only at `max_new_tokens`: a chat's default budget of 512 ran past the last
    position of a model with 512 (the bundled one) into positions it never saw in training, and
    the cache's length (prompt + budget) followed each turn's prompt, so a turn whose prompt
    passed the next multiple of 32 compiled the decode loop again (~3 s a turn on the bundled
    model). A row now also stops at the model's last position; the buffers are sized by the budget
    and the model, so such a turn compiles its prefill only."""
    cfg, params = pipe.model.config, pipe.model.params
    positions = 160
    loop = DecodeLoop(cfg.replace(decoder=dataclasses.replace(cfg.decoder, max_position_embeddings=positions)),
                      params)

    def text(words, seed):  # no stop token: only the budget or the positions end it
        return pipe.understand_request([], words, max_new_tokens=512, temperature=1.0, seed=seed, stop_tokens=())

    first = text("he", 1)
    out = loop.generate([first]).tokens[0]
    room = positions - len(first.tokens)
    assert len(out) == room
    # the same tokens as the budget set to the room by hand, on the model's real length
    exact = DecodeLoop(cfg, params).generate([dataclasses.replace(first, max_new_tokens=room)]).tokens[0]
    np.testing.assert_array_equal(out, exact)

    words = "he"
    later = first
    while -(-len(later.tokens) // 32) == -(-len(first.tokens) // 32):  # a prompt in the next multiple of 32
        words += " is the cat"
        later = text(words, 2)
    runs, prefills = loop._run._cache_size(), loop._prefill._cache_size()
    out = loop.generate([later]).tokens[0]
    assert len(out) == positions - len(later.tokens)
    assert (loop._run._cache_size(), loop._prefill._cache_size()) == (runs, prefills + 1)  # a new prefill only

    # the error a conversation past the model's length raises (the server answers it context_length_exceeded,
    # which its web page trims turns on; the chat CLI suggests /reset)
    from unitoken_jax.tokenizer.conversation import SequenceTooLong

    with pytest.raises(SequenceTooLong, match=f"none of the model's {positions}"):
        loop.generate([text("he" + " is the cat" * 60, 3)])
    picture = pipe.generate_request("a cat", size=(32, 32), cfg=3.0)
    need = layout.generated_image_length((1, 1)) - 1
    tight = cfg.replace(decoder=dataclasses.replace(cfg.decoder,
                                                    max_position_embeddings=len(picture.tokens) + need - 1))
    with pytest.raises(ValueError, match=f"the {need - 1} positions the model has after the prompt's"):
        DecodeLoop(tight, params).generate([picture])
    # an unconditional context (a negative prompt) longer than the prompt: the room is the
    # partner's, whose row writes a position for each new token (past the end, the cache's last
    # position was overwritten again and again: a wrong picture, silently)
    partner = np.concatenate([picture.tokens[:-1], picture.tokens])
    guided = dataclasses.replace(picture, uncond_tokens=partner)
    fits = lambda n: DecodeLoop(cfg.replace(decoder=dataclasses.replace(  # noqa: E731
        cfg.decoder, max_position_embeddings=n)), params)
    np.testing.assert_array_equal(fits(len(partner) + need).generate([guided]).tokens[0],
                                  DecodeLoop(cfg, params).generate([guided]).tokens[0])
    with pytest.raises(ValueError, match=f"the {need - 1} positions the model has after the unconditional context"):
        fits(len(partner) + need - 1).generate([guided])


def test_an_answer_cut_by_its_budget_or_the_models_end_is_said(pipe):
    """Nothing is cut silently: an answer that stops at its `max_new_tokens` or at the model's last
    position before its end (a stop token) warns, naming which and where; one that ends does not."""
    import warnings

    from unitoken_jax.inference.pipeline import AnswerCut

    cut = pipe.understand_request([], "he is", max_new_tokens=4, stop_tokens=())  # greedy: only the budget ends it
    ids = pipe.decode_loop.generate([cut]).tokens[0]
    assert len(ids) == 4
    ends = dataclasses.replace(cut, stop_tokens=(int(ids[1]),))  # the same answer, ended by its second token
    with pytest.warns(AnswerCut, match="^the answer stopped at max_new_tokens=4 before its end$"):
        pipe.run([cut])
    with pytest.warns(AnswerCut):
        two = pipe.run([dataclasses.replace(cut, max_new_tokens=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # (the same ids, ended: a last character's missing bytes are said, U+FFFD, where a cut answer
        # leaves them out)
        from unitoken_jax.tokenizer.conversation import decode

        assert pipe.run([ends]) == [decode(ids[:2].tolist(), pipe.tokenizer, pipe.vq, repair=True)]
        assert two == [decode(ids[:2].tolist(), pipe.tokenizer, pipe.vq, repair=True, unfinished=True)]
    assert not [w for w in caught if issubclass(w.category, AnswerCut)]
    positions = pipe.model.config.decoder.max_position_embeddings
    words = "he"
    while len(pipe.understand_request([], words + " is").tokens) < positions - 1:
        words += " is"
    last = pipe.understand_request([], words, max_new_tokens=64, stop_tokens=())
    assert positions - len(last.tokens) < 64
    with pytest.warns(AnswerCut, match=re.escape("answers stopped before their end: 0 at max_new_tokens=4, 2 at the "
                                                 f"model's last position ({positions})")):
        pipe.run([cut, ends, last])


def test_a_picture_cut_by_its_budget_is_completed_and_said_and_the_batchs_other_answers_kept(pipe):
    """`run` repairs by default: a picture cut off by `max_new_tokens` comes back completed with a
    `PictureRepaired` warning beside the batch's other answers (it had raised MalformedImageTokens
    after the whole batch decoded, losing every answer); `repair=False` still raises."""
    from unitoken_jax.inference.pipeline import AnswerCut, PictureRepaired
    from unitoken_jax.tokenizer.layout import MalformedImageTokens

    text = pipe.understand_request([], "he is", max_new_tokens=3)
    # a picture whose size the model chooses (as a chat's): no size is checked against the budget
    short = dataclasses.replace(pipe.generate_request("he is the", size=(64, 32), seed=2), grid_hw=None, max_grid=2,
                                max_new_tokens=6)
    with pytest.warns(AnswerCut):
        alone = pipe.run([text])
    with pytest.warns(AnswerCut), pytest.warns(PictureRepaired, match=r"answer 1: its \d+x\d+ picture did not "
                                                                       "finish before max_new_tokens=6"):
        answers = pipe.run([text, short])
    assert answers[0] == alone[0]
    (picture,) = answers[1]
    assert isinstance(picture, Image.Image)
    with pytest.raises(MalformedImageTokens):
        pipe.run([text, short], repair=False)
    # cut by the model's last position, not its budget: said so (it said "max_new_tokens=N or the
    # model's positions", and the CLI's hint to raise --max-new-tokens did nothing)
    positions = pipe.model.config.decoder.max_position_embeddings
    prompt = np.concatenate([np.full(positions - 6, short.tokens[0]), short.tokens[-1:]])  # (ends at <racm3:break>)
    late = dataclasses.replace(short, tokens=prompt, max_new_tokens=100)
    with pytest.warns(PictureRepaired, match=re.escape(f"picture did not finish before the model's last position "
                                                       f"({positions})")):
        pipe.run([late])


def test_a_chat_streams_its_text_while_it_is_generated(pipe):
    """`stream` gets the answer's text chunk by chunk while it is generated (a 150-token answer:
    three chunks of the loop's 64 steps), the pieces make the start of the finished answer, and
    streaming changes nothing in it."""
    request = pipe.understand_request([], "he is", max_new_tokens=150, temperature=1.0, seed=4, stop_tokens=())
    plain = pipe.run([request])
    pieces = []
    streamed = pipe.run([request], stream=lambda i, text: pieces.append((i, text)))
    assert streamed == plain
    assert len(pieces) >= 2 and all(i == 0 for i, _ in pieces)  # before the end, not only at it
    sent = "".join(text for _, text in pieces)
    assert len(sent) > 0.5 * len(plain[0][0]) and plain[0][0].startswith(sent)
    said = []
    answer = pipe.chat([{"from": "human", "value": "he is"}], max_new_tokens=100, stop_tokens=(), stream=said.append)
    assert said and answer[0].startswith("".join(said))
    said = []  # understand: one question streams text, a list streams (i, text)
    answer = pipe.understand([], "he is", max_new_tokens=100, stop_tokens=(), stream=said.append)
    assert said and answer.startswith("".join(said))
    said = []
    answers = pipe.understand([[], []], ["he is", "the cat"], max_new_tokens=100, stop_tokens=(),
                              stream=lambda i, text: said.append((i, text)))
    for i in (0, 1):
        mine = "".join(text for j, text in said if j == i)
        assert mine and answers[i].startswith(mine)


def test_many_questions_and_prompts_run_in_batches_of_batch_size(pipe):
    """`batch_size` splits a long list into batches (a folder to caption): the answers and pictures
    are the ones one batch gives (a batch of N equals N single runs), streamed text and warnings
    number the answers across batches, and mismatched lists are an error, not a silent zip."""
    from unitoken_jax.inference.pipeline import AnswerCut

    cat = str(pipe.image_dir / "cat.png")
    images = [[cat], [], [cat], [], [cat]]
    questions = ["the cat is", "he is", "or the", "the cat", "he"]
    options = dict(max_new_tokens=6, temperature=1.0, seed=3, stop_tokens=())
    with pytest.warns(AnswerCut):
        whole = pipe.understand(images, questions, **options)
    pieces = []
    with pytest.warns(AnswerCut, match=re.escape("answers stopped before their end: 0 at max_new_tokens=6, "
                                                 "1 at max_new_tokens=6, 2 at") + ".* 4 at max_new_tokens=6$"):
        batched = pipe.understand(images, questions, batch_size=2, stream=lambda i, t: pieces.append((i, t)),
                                  **options)
    assert batched == whole
    assert {i for i, _ in pieces} == set(range(5))
    for i in range(5):
        assert batched[i].startswith("".join(t for j, t in pieces if j == i))
    with pytest.raises(ValueError, match="5 questions and 4 lists of pictures"):
        pipe.understand(images[:4], questions)
    with pytest.raises(ValueError, match="batch_size must be a whole number, at least 1"):
        pipe.understand(images, questions, batch_size=0)
    prompts = ["he is", "the cat", "or"]
    one = pipe.generate_image(prompts, size=(32, 32), n=2, seed=1, progress=False)
    three = pipe.generate_image(prompts, size=(32, 32), n=2, seed=1, progress=False, batch_size=4)
    for a, b in zip(sum(one, []), sum(three, [])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _chat_turns(pipe, loop, turns, **options):
    """Runs a conversation through `loop` with the cache reused, turn by turn; yields each turn's
    request and the tokens drawn (the random model's answers are noise: the history holds a fixed
    answer instead, which the kept cache does not hold past the prompt)."""
    messages, images = [], []
    for i, (text, picture) in enumerate(turns):
        messages.append({"from": "human", "value": text})
        images += [picture] if picture is not None else []
        request = pipe.chat_request(messages, list(images), seed=i, **options)
        drawn = loop.generate([request], reuse_cache=True).tokens[0]
        yield request, drawn
        messages.append({"from": "gpt", "value": "he is the cat"})


class _Counting:
    """Wraps a jitted step and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.mark.parametrize("layers", ["unrolled", "scan"])
def test_a_chats_next_turn_reuses_the_kept_cache_and_draws_what_a_full_prefill_draws(pipe, layers):
    """Each chat turn prefilled its whole history again, and on an accelerator (a cache sized by
    prompt + budget) compiled a new prefill and loop whenever the history passed a multiple of 32:
    ~12-15 s a turn for the 7B on a v5e (AOT). With `reuse_cache` a turn computes only the positions
    its prompt does not share with the last turn's prompt and answer. A conversation about two
    pictures, sampled: every turn draws the tokens the full prefill draws, the earlier turns' are
    not prefilled again, and a picture swapped for another under the same tokens is computed again
    from its first feature on."""
    cat, coffee = str(pipe.image_dir / "cat.png"), str(pipe.image_dir / "coffee.png")
    loop = DecodeLoop(pipe.model.config, pipe.model.params, layers=layers)
    fresh = DecodeLoop(pipe.model.config, pipe.model.params, layers=layers)
    prefill = loop._prefill = _Counting(loop._prefill)
    extend = loop._extend = _Counting(loop._extend)
    turns = [("<|image|> the cat is", cat), ("and he is", None), ("<|image|> or the", coffee), ("the cat", None)]
    for i, (request, drawn) in enumerate(_chat_turns(pipe, loop, turns, max_new_tokens=12, temperature=1.0)):
        np.testing.assert_array_equal(drawn, fresh.generate([request]).tokens[0])
        assert (prefill.calls, extend.calls) == (1, i)  # the first turn prefills, the others extend
        kept = loop._kept
        assert len(kept.tokens) > len(request.tokens) and np.array_equal(kept.tokens[:len(request.tokens)],
                                                                         request.tokens)
    # a guided turn that draws: its row continues the kept cache, its unconditional partner is a
    # second row prefilled alongside; only the row is kept
    def then_draw(r, **options):
        pad = np.zeros(1, r.is_continuous.dtype)
        return dataclasses.replace(r, tokens=np.append(r.tokens, layout.IMAGE_START), grid_hw=(1, 1),
                                   max_new_tokens=layout.generated_image_length((1, 1)), stop_after_image=True,
                                   is_continuous=np.concatenate([r.is_continuous, pad]),
                                   feature_index=np.append(r.feature_index, 0), **options)

    guided = then_draw(request, cfg_scale=3.0, seed=11)
    assert loop._reusable(loop._kept, guided) >= len(request.tokens)
    drawn = loop.generate([guided], reuse_cache=True).tokens[0]
    np.testing.assert_array_equal(drawn, fresh.generate([guided]).tokens[0])
    assert layout.IMAGE_END in drawn.tolist() and loop._kept.cache["index"].shape == (1,)
    assert not np.array_equal(drawn, fresh.generate([then_draw(request, seed=11)]).tokens[0])  # guidance mattered
    assert extend.calls == len(turns)
    loop.generate([request], reuse_cache=True)  # (the kept cache the next checks start from)

    # the same tokens with the first picture swapped: the reuse stops at its first feature, and the
    # first logits from the kept cache are the full prefill's
    swapped = dataclasses.replace(request, pixels=request.pixels[::-1].copy())
    first_feature = int(np.argmax(request.is_continuous))
    start = loop._reusable(loop._kept, swapped)
    assert 0 < start <= first_feature < loop._reusable(loop._kept, request)
    _, batch, _, _, cache_len = fresh._prepare([swapped])
    full, _ = fresh._prefill(fresh.params, *batch, cache_len)
    cache, loop._kept = loop._kept.cache, None  # (its buffers go to the extend)
    reused, _ = loop._extend_from(cache, swapped, start, cache_len)
    np.testing.assert_allclose(reused, full, atol=2e-5, rtol=2e-5)
    # and the tokens drawn
    loop.generate([request], reuse_cache=True)
    np.testing.assert_array_equal(loop.generate([swapped], reuse_cache=True).tokens[0],
                                  fresh.generate([swapped]).tokens[0])
    # a call that does not reuse the cache frees it; the next turn prefills again
    loop.generate([pipe.understand_request([], "he is", max_new_tokens=2)])
    assert loop._kept is None
    calls = prefill.calls
    loop.generate([request], reuse_cache=True)
    assert (prefill.calls, loop._kept is not None) == (calls + 1, True)


def test_a_turn_that_fills_the_model_reuses_from_a_multiple_of_32(pipe):
    """Where the rest of a prompt, padded, would pass the cache's end (a turn that fills the
    model), the reuse starts at the multiple of 32 below the shared positions, so the padding ends
    within the prompt's width; the turn draws what a full prefill draws, to the last position."""
    cfg = pipe.model.config
    positions = 160
    cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, max_position_embeddings=positions))
    loop, fresh = DecodeLoop(cfg, pipe.model.params), DecodeLoop(cfg, pipe.model.params)

    def text(words, seed):
        return pipe.understand_request([], words, max_new_tokens=512, temperature=1.0, seed=seed, stop_tokens=())

    first = dataclasses.replace(text("he is the cat " * 12, 1), max_new_tokens=8)
    loop.generate([first], reuse_cache=True)
    extra = ""
    while True:  # shares the first prompt but its last position; its rest, padded, passes position 160
        extra += " or the"
        later = text("he is the cat " * 12 + extra, 2)
        shared = loop._reusable(loop._kept, later)
        if shared + prefill_width(len(later.tokens) - shared, 32) > positions:
            break
    assert shared % 32 and prefill_width(len(later.tokens), 32) == positions
    # the first logits (the random model's sampled tokens barely depend on a few misplaced keys)
    _, batch, _, _, cache_len = fresh._prepare([later])
    full, _ = fresh._prefill(fresh.params, *batch, cache_len)
    cache, loop._kept = loop._kept.cache, None
    reused, _ = loop._extend_from(cache, later, shared, cache_len)
    np.testing.assert_allclose(reused, full, atol=2e-5, rtol=2e-5)
    loop.generate([first], reuse_cache=True)
    extend = loop._extend = _Counting(loop._extend)
    out = loop.generate([later], reuse_cache=True).tokens[0]
    assert extend.calls == 1 and len(out) == positions - len(later.tokens)
    np.testing.assert_array_equal(out, fresh.generate([later]).tokens[0])


def test_a_kept_cache_grows_by_doubling_and_turns_within_it_compile_no_new_loop(pipe, fresh_programs):
    """On an accelerator (scanned layers), a chat's cache follows what its rows reach, not prompt
    + budget: it starts at the first of 256, 512, ... that holds the first turn's prompt and first
    chunk of answer, and a kept cache too short for the next turn doubles (at most the model's
    positions), so a conversation compiles its loop a logarithmic number of times, not once a
    turn, and a step reads about the slots the conversation fills."""
    cfg = pipe.model.config
    positions = 1024
    loop = DecodeLoop(cfg.replace(decoder=dataclasses.replace(cfg.decoder, max_position_embeddings=positions)),
                      pipe.model.params, layers="scan")
    lengths, programs, requests = [], [], []
    turns = [(words * 6, None) for words in ["he is ", "the cat ", "or the ", "he is the cat ", "or ", "the cat is "]]
    for request, drawn in _chat_turns(pipe, loop, turns, max_new_tokens=24, temperature=1.0):
        lengths.append(cache_length(loop._kept.cache))
        programs.append(loop._run._cache_size())
        requests.append(request)
        assert lengths[-1] >= len(request.tokens) + len(drawn)
    def grown(size, need):  # the doubling chain from `size`, to the first length that holds `need`
        while size < need:
            size = min(2 * size, positions)
        return size

    needs = [min(prefill_width(len(r.tokens), 32) + 24, positions) for r in requests]  # prompt + answer
    assert needs[0] < 256 < needs[-1] and lengths[0] == 256
    for a, b, need in zip(lengths, lengths[1:], needs[1:]):
        assert b == grown(a, need)
    assert len(set(lengths)) < len(lengths)  # turns shared a length ...
    assert programs[-1] == len(set(lengths))  # ... and compiled one loop per length
    # a turn whose answer passes its cache's length doubles it between chunks, and draws what a
    # full-length cache draws: a prompt of 160 and 150 new tokens start at 256 and end at 512
    words = "he"
    while prefill_width(len(pipe.understand_request([], words + " is").tokens), 32) <= 160:
        words += " is"
    request = pipe.understand_request([], words[:-3], max_new_tokens=150, temperature=1.0, seed=5, stop_tokens=())
    assert prefill_width(len(request.tokens), 32) == 160
    fresh = DecodeLoop(loop.config, pipe.model.params, layers="scan")
    drawn = fresh.generate([request], reuse_cache=True).tokens[0]
    assert cache_length(fresh._kept.cache) == 512 and len(drawn) == 150
    np.testing.assert_array_equal(drawn, loop.generate([request]).tokens[0])  # (prompt + budget: 310 slots)


def test_auto_unrolls_on_a_cpu_only_where_the_copy_fits(pipe, monkeypatch):
    from unitoken_jax.inference import decode

    params = pipe.model.params
    layer_bytes = decode._copy_bytes(params, 8196)
    stacked = params["decoder"]["layers"], params["vit"]["layers"]
    kernel = params["decoder"]["lm_head"]["kernel"]  # the head's 8,196 code columns are copied too
    assert layer_bytes == sum(a.nbytes for a in jax.tree.leaves(stacked)) + kernel.shape[0] * 8196 * kernel.itemsize
    # the loop's own copy (its arrays that are not the model's) is exactly what the count says
    copy = decode.cpu_decode_params(params, pipe.model.config, head_prefix=8196)
    shared = {id(a) for a in jax.tree.leaves(params)}
    assert layer_bytes == sum(a.nbytes for a in jax.tree.leaves(copy) if id(a) not in shared)
    assert DecodeLoop(pipe.model.config, pipe.model.params).layers == "unrolled"
    page = os.sysconf("SC_PAGE_SIZE")
    free_pages = {"SC_PAGE_SIZE": page, "SC_AVPHYS_PAGES": (2 * layer_bytes - 1) // page}  # just under 2 copies
    monkeypatch.setattr(decode.os, "sysconf", lambda name: free_pages[name])
    assert DecodeLoop(pipe.model.config, pipe.model.params).layers == "scan"


def test_auto_unrolls_on_one_gpu_where_the_copy_fits_and_scans_elsewhere(pipe):
    """On an H200 the 7B's scanned decode step took 3x its unrolled one (12.2 against 4.1 ms), so
    `auto` unrolls float weights on one GPU with twice the copy free in its memory; int8, TPUs,
    meshes of several devices and a GPU that does not report its memory scan."""
    import types

    from unitoken_jax.inference import decode

    config, params = pipe.model.config, pipe.model.params
    copy = decode._copy_bytes(params, 8196)

    def gpu(free, platform="gpu"):
        stats = {"bytes_limit": 10 * copy + 7, "bytes_in_use": 10 * copy + 7 - free}
        return types.SimpleNamespace(platform=platform, memory_stats=lambda: stats)

    assert decode.auto_layers(config, params, [gpu(2 * copy)]) == "unrolled"
    assert decode.auto_layers(config, params, [gpu(2 * copy - 1)]) == "scan"  # just under two copies free
    assert decode.auto_layers(config, params, [gpu(10 * copy), gpu(10 * copy)]) == "scan"
    assert decode.auto_layers(config, params, [gpu(10 * copy, platform="tpu")]) == "scan"
    assert decode.auto_layers(config, params, [types.SimpleNamespace(platform="gpu", memory_stats=lambda: None)]) \
        == "scan"
    assert decode.auto_layers(config.replace(quantize="int8"), params, [gpu(10 * copy)]) == "scan"
    assert decode.auto_layers(config, params, [jax.devices("cpu")[0]]) == "unrolled"  # this host: it fits


def test_the_unconditional_context_and_the_image_prefix(pipe):
    """The guided row's partner sees what the reference's CFG processor gives it: the ids from
    <racm3:break> on, or, with a negative prompt, that prompt as a human turn, then the same image
    prefix and <racm3:break>; the prefix (16853 in the release) goes just before <racm3:break>."""
    prefix = [9000, 9001]
    pipe2 = UniTokenPipeline(pipe.model, pipe.tokenizer, pipe.vq, vq_size=32, image_prefix=prefix)
    plain = pipe2.generate_request("he is", size=(64, 32), cfg=3.0)
    assert plain.tokens[-3:].tolist() == [*prefix, layout.IMAGE_START]
    assert plain.tokens[-4] == layout.END_OF_TURN  # the human turn is closed before the prefix
    assert plain.uncond_tokens.tolist() == [layout.IMAGE_START]
    negative = pipe2.generate_request("he is", size=(64, 32), cfg=3.0, negative_prompt="or not")
    human_turn = pipe2.understand_request([], "or not").tokens  # the same conversation, asked as a question
    assert negative.uncond_tokens.tolist() == [*human_turn.tolist(), *prefix, layout.IMAGE_START]
    assert "or not" in pipe.tokenizer.decode_text(human_turn.tolist())
    assert negative.tokens.tolist() == plain.tokens.tolist()  # the conditional row does not change
    unguided = pipe2.generate_request("he is", size=(64, 32), cfg=1.0)
    assert unguided.uncond_tokens is None


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_greedy_text_equals_transformers_generate(tmp_path, layers):
    """Both ways the loop runs the layers (a scan over stacked weights and KV cache, what
    accelerators run; unrolled with a buffer per layer, what CPUs run) decode transformers' text."""
    from transformers import LogitsProcessor, LogitsProcessorList

    hf = oracles.make_chameleon(seed=9)
    oracles.write_chameleon(tmp_path, hf)
    model = unitoken_jax.load(str(tmp_path))
    text_ok = np.asarray(grid.allowed(grid.GridState.start([0], [(0, 0)], [0], [False], [False]), oracles.VOCAB))[0]

    class TextOnly(LogitsProcessor):  # what our text mode allows: no image codes or image-internal ids
        def __call__(self, input_ids, scores):
            return scores.masked_fill(torch.from_numpy(~text_ok)[None], -float("inf"))

    prompts = [[1, 8900, 8901, 8902, 8903], [1, 8920, 8921]]
    # greedy text; the image temperature (hot here) must not touch text rows
    requests = [Request(np.array(p), max_new_tokens=12, stop_tokens=(-5,), image_temperature=100.0, image_top_k=0)
                for p in prompts]
    ours = DecodeLoop(model.config, model.params, layers=layers).generate(requests).tokens
    for p, mine in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, logits_processor=LogitsProcessorList([TextOnly()]))
        assert mine.tolist() == theirs[0, len(p):].tolist()


def _oracle_greedy_text(model, request, max_new):
    """Greedy text written out with full forwards (no cache): argmax over the ids a text row may
    emit, until the end-of-turn token."""
    tokens, cont, index = list(request.tokens), list(request.is_continuous), list(request.feature_index)
    text_ok = np.asarray(grid.allowed(grid.GridState.start([0], [(0, 0)], [0], [False], [False]),
                                      model.config.decoder.vocab_size))[0]
    out = []
    for _ in range(max_new):
        logits, _ = model.forward(np.array([tokens]), is_continuous=np.array([cont]), feature_index=np.array([index]),
                                  pixels=request.pixels)
        tok = int(np.argmax(np.where(text_ok, np.asarray(logits)[0, -1], -np.inf)))
        out.append(tok)
        if tok == layout.END_OF_TURN:
            break
        tokens, cont, index = tokens + [tok], cont + [False], index + [0]
    return out


def test_understand_answers_with_the_greedy_continuation(pipe):
    cat = str(pipe.image_dir / "cat.png")
    # (12 ids: the random model's first ones are mostly special tokens, which are no text)
    request = pipe.understand_request([cat], "the cat is", max_new_tokens=12)
    ids = _oracle_greedy_text(pipe.model, request, 12)
    from unitoken_jax.tokenizer.conversation import decode

    # an answer cut by its budget leaves out the bytes of a character that never came, as `understand` does
    (expected,) = decode(ids, pipe.tokenizer, unfinished=layout.END_OF_TURN not in ids)
    assert expected.strip()  # a random model's greedy answer still says something
    assert pipe.understand([cat], "the cat is", max_new_tokens=12) == expected
    # a batch of two questions (one without a picture) answers each as alone
    answers = pipe.understand([[cat], []], ["the cat is", "or"], max_new_tokens=12)
    alone = pipe.understand([], "or", max_new_tokens=12)
    assert answers == [expected, alone] and alone.strip()


def test_pipelines_draw_pictures_edit_and_chat(pipe):
    cat = str(pipe.image_dir / "cat.png")
    pictures = pipe.generate_image("he is", size=(64, 32), n=2, seed=7, progress=False)
    assert len(pictures) == 2 and all(p.size == (16, 8) for p in pictures)  # the test VQ-GAN: 4 px a code
    assert not np.array_equal(np.asarray(pictures[0]), np.asarray(pictures[1]))
    # the picture is the VQ-GAN's drawing of the codes the decode loop chose
    request = pipe.generate_request("he is", size=(64, 32), seed=7)
    (ids,) = pipe.decode_loop.generate([request]).tokens
    codes = layout.parse_image_ids([layout.IMAGE_START, *ids.tolist()]).code_ids
    drawn = pipe.vq.decode_to_pil(pipe.tokenizer.ids_to_codes(codes)[None])[0]
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(pictures[0]))
    edited = pipe.edit(cat, "the", size=(32, 32), progress=False)
    assert edited.size == (8, 8)
    # n edits: seeds seed, seed + 1, ... (it took no n), as many lists as instructions
    alone = [np.asarray(pipe.edit(cat, "the", size=(32, 32), seed=s, progress=False)) for s in (5, 6)]
    several = pipe.edit(cat, "the", size=(32, 32), seed=5, n=2, progress=False)
    assert [np.asarray(p).tolist() for p in several] == [a.tolist() for a in alone]
    assert not np.array_equal(alone[0], alone[1])
    both = pipe.edit([cat, cat], ["the", "he"], size=(32, 32), seed=5, n=2, progress=False)
    assert len(both) == 2 and [np.asarray(p).tolist() for p in both[0]] == [a.tolist() for a in alone]
    with pytest.raises(ValueError, match="n must be a whole number of pictures"):
        pipe.edit(cat, "the", n=0)
    # the edit prompt is the reference's (its image-to-image demo: `prompt + " <|image|>"`): the
    # instruction's words, then the picture; none of them after it
    tokens = pipe.edit_request(cat, "he is the", size=(32, 32)).tokens.tolist()
    start, end = tokens.index(layout.IMAGE_START), tokens.index(layout.IMAGE_END)
    assert tokens[0] == pipe.tokenizer.bos_id and pipe.tokenizer.decode_text(tokens[1:start]).strip() == "he is the"
    assert "he" not in pipe.tokenizer.decode_text(tokens[end + 1:])
    parts = pipe.chat([{"from": "human", "value": "the"}], max_new_tokens=4)
    # (the random model's few tokens may all be special ones, which are no text: then an empty answer)
    assert all(isinstance(p, (str, Image.Image)) for p in parts)
    (ids,) = pipe.decode_loop.generate([pipe.chat_request([{"from": "human", "value": "the"}],
                                                          max_new_tokens=4)]).tokens
    from unitoken_jax.tokenizer.conversation import decode

    said = [p for p in decode(ids, pipe.tokenizer, pipe.vq, repair=True, unfinished=True) if isinstance(p, str)]
    assert [p for p in parts if isinstance(p, str)] == said and len(ids) == 4


def test_sharded_decoding_equals_single_device(pipe):
    from unitoken_jax import sharding

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    sharded = unitoken_jax.UniTokenModel(pipe.model.config, pipe.model.params).shard(mesh)
    requests = _requests(pipe)[:2]
    single = pipe.decode_loop.generate(requests).tokens
    multi_loop = DecodeLoop(sharded.config, sharded.params, mesh)
    multi = multi_loop.generate(requests).tokens
    for a, b in zip(single, multi):
        np.testing.assert_array_equal(a, b)
    # a mesh that does not divide the weights, named by weight as the CLI names it (load, shard and
    # random gave JAX's IndivisibleError: a sharding spec and a shape)
    from unitoken_jax.world import default

    bad = sharding.make_mesh(data=1, fsdp=1, tensor=8, devices=jax.devices()[:8])
    said = r"the mesh \{'data': 1, 'fsdp': 1, 'tensor': 8\} does not split the model's weights evenly: .* ways"
    with pytest.raises(ValueError, match=said):
        unitoken_jax.UniTokenModel(pipe.model.config, pipe.model.params).shard(bad)
    with pytest.raises(ValueError, match=said):
        unitoken_jax.load(os.path.join(default.DEFAULT_DIR, "model"), mesh=bad, progress=False)
    with pytest.raises(ValueError, match=said):
        unitoken_jax.UniTokenModel.random(pipe.model.config, mesh=bad)
    with pytest.raises(ValueError, match=re.escape("needs 4 devices, 8 are available (devices=jax.devices()[:4] "
                                                   "uses 4 of them)")):
        sharding.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:8])
    # a chat's turns with the kept cache sharded (the extend writes into it under the mesh)
    cat = str(pipe.image_dir / "cat.png")
    turns = [("<|image|> " + "the cat is " * 3, cat), ("and he is the cat or " * 3, None)]
    chat = [drawn for _, drawn in _chat_turns(pipe, multi_loop, turns, max_new_tokens=6, temperature=1.0)]
    assert multi_loop._kept is not None and len(multi_loop._kept.cache["k"]) and multi_loop._extend._cache_size()
    for (request, _), drawn in zip(_chat_turns(pipe, DecodeLoop(pipe.model.config, pipe.model.params), turns,
                                               max_new_tokens=6, temperature=1.0), chat):
        np.testing.assert_array_equal(drawn, pipe.decode_loop.generate([request]).tokens[0])


def test_smoke_bfloat16_decoding_draws_a_well_formed_picture(pipe):
    """A smoke test (bfloat16 has no oracle here): it runs, and the grid still holds."""
    model = pipe.model
    cfg = model.config.replace(dtype="bfloat16")
    req = pipe.generate_request("he", size=(32, 32), cfg=3.0)
    (tokens,) = DecodeLoop(cfg, model.params).generate([req]).tokens
    parsed = layout.parse_image_ids([layout.IMAGE_START, *tokens.tolist()])  # strict: raises if malformed
    assert parsed.code_ids.shape == (2, 2) and not parsed.repairs


def test_bad_requests(pipe):
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.generate_request("x", size=(40, 32))
    with pytest.raises(ValueError, match="cannot hold"):
        pipe.decode_loop.generate([pipe.generate_request("x", size=(64, 64), max_new_tokens=10)])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        UniTokenPipeline(pipe.model, pipe.tokenizer, pipe.vq, image_prefix=(16853,))  # the reference's, > 9216
    # the defaults come from the model (issue 15: a small model was refused for 16853, then overflowed at 512 px)
    derived = UniTokenPipeline(pipe.model, pipe.tokenizer, pipe.vq)
    length = pipe.model.config.decoder.max_position_embeddings
    assert derived.image_prefix == [] and derived.vq_size < 512 and (derived.vq_size // 4) ** 2 <= length // 4
    assert (2 * derived.vq_size // 4) ** 2 > length // 4  # the largest such halving of 512


def test_a_model_trained_here_draws_and_edits_its_training_pictures_grid_without_a_size(pipe, tmp_path):
    """A model whose record says its pictures were cut at 32 px for a VQ-GAN of 4 px a code (a tiny
    stage III run on the demo data) drew and edited at 512 x 512 without a size: a grid it never
    drew, too long for it (`unitoken edit` failed unasked). Its default is now the size that asks
    for its training grid (8 x 8 codes: 128 x 128 in the prompt's 16-px-a-code units, 32 x 32 px)."""
    import copy
    import json

    from unitoken_jax.inference.pipeline import TRAINED_PICTURES

    (tmp_path / TRAINED_PICTURES).write_text(json.dumps({"vq_size": 32}))
    model = copy.copy(pipe.model)
    model.source = str(tmp_path)
    trained = UniTokenPipeline(model, pipe.tokenizer, pipe.vq, image_prefix=())
    assert trained.default_size == (128, 128) and trained.vq_size == 32
    assert trained.generate_request("he is").grid_hw == (4, 4)  # grid units of 2 codes: 8 x 8 codes
    assert trained.edit_request(str(pipe.image_dir / "cat.png"), "the").grid_hw == (4, 4)
    assert UniTokenPipeline(pipe.model, pipe.tokenizer, pipe.vq, image_prefix=()).default_size == (512, 512)


def test_cli_verbs(pipe, tmp_path, capsys, monkeypatch):
    import io

    from unitoken_jax import cli

    pipe.model.save_hf(str(tmp_path / "model"))
    (tmp_path / "tok.json").write_text(tokenizer_fixture.build())
    save_vqgan(str(tmp_path / "vq"), pipe.vq.config, pipe.vq.params)  # our VQ-GAN format (a directory)
    common = ["--model", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok.json"),
              "--vqgan", str(tmp_path / "vq"), "--image-prefix", "", "--vq-size", "32"]
    cat = str(pipe.image_dir / "cat.png")
    # (12: the random model's first ids are mostly special tokens, which are no text)
    assert cli.main(["understand", cat, "the cat is", "--max-new-tokens", "12", *common]) == 0
    out, err = capsys.readouterr()  # (the random model's answer does not end: the cut is said, after it)
    assert out.strip() != "" and "understand: the answer stopped at max_new_tokens=12 before its end" in err
    assert cli.main(["generate", "he is", "--out", str(tmp_path / "g.png"), "--n", "2", "--size", "64x32",
                     *common]) == 0
    assert Image.open(tmp_path / "g_0.png").size == (16, 8) and (tmp_path / "g_1.png").exists()
    # (--size counts the release VQ-GAN's 16 px a code; this one draws 4: the difference is said)
    assert ("(the picture is 16x8 pixels: --size 64x32 counts 16 px a code, as the release's VQ-GAN draws them, "
            "and this VQ-GAN draws 4)") in capsys.readouterr().err
    # no --size, a model whose record gives its pictures' 32 px crop: its own grid (8 x 8 codes), said as its own
    (tmp_path / "model" / "trained_pictures.json").write_text('{"vq_size": 32}')
    assert cli.main(["generate", "he is", "--out", str(tmp_path / "own.png"), *common]) == 0
    assert Image.open(tmp_path / "own.png").size == (32, 32)
    assert "(the picture is 32x32 pixels: the model's own size 128x128 counts 16 px a code" in capsys.readouterr().err
    os.remove(tmp_path / "model" / "trained_pictures.json")
    # a cache grown 32 slots at a time draws the same pictures; a growth of 0 is refused by name
    assert cli.main(["generate", "he is", "--out", str(tmp_path / "h.png"), "--n", "2", "--size", "64x32",
                     "--cache-growth", "32", *common]) == 0
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"g_{i}.png")),
                              np.asarray(Image.open(tmp_path / f"h_{i}.png")))
    capsys.readouterr()
    # an empty prompt draws (unconditionally), and says so
    assert cli.main(["generate", " ", "--out", str(tmp_path / "u.png"), "--n", "2", "--size", "64x32", *common]) == 0
    assert "the prompt is empty" in capsys.readouterr().err and (tmp_path / "u_1.png").exists()
    with pytest.raises(SystemExit) as stop:  # (by its option, before the model loads)
        cli.main(["generate", "x", "--out", str(tmp_path / "z.png"), "--cache-growth", "0", *common])
    assert stop.value.code == 2 and "argument --cache-growth: 0 is out of range" in capsys.readouterr().err
    # a --model that is no model directory is what the error names, not the tokenizer left out
    assert cli.main(["generate", "x", "--out", str(tmp_path / "z.png"), "--model", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none'} is not a directory" in capsys.readouterr().err
    # scanned layers (what `auto` runs on a TPU) draw the same pictures as this CPU's unrolled default
    from unitoken_jax.inference import pipeline as pipeline_module

    ran = []

    class Recorded(DecodeLoop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ran.append(self.layers)

    monkeypatch.setattr(pipeline_module, "DecodeLoop", Recorded)
    assert cli.main(["generate", "he is", "--out", str(tmp_path / "s.png"), "--n", "2", "--size", "64x32",
                     "--layers", "scan", *common]) == 0
    assert ran == ["scan"]
    monkeypatch.setattr(pipeline_module, "DecodeLoop", DecodeLoop)
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"g_{i}.png")),
                              np.asarray(Image.open(tmp_path / f"s_{i}.png")))
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--out", str(tmp_path / "z.png"), "--layers", "rolled", *common])
    assert "invalid choice: 'rolled'" in capsys.readouterr().err
    assert cli.main(["edit", cat, "the", "--out", str(tmp_path / "e.png"), "--size", "32x32", *common]) == 0
    assert (tmp_path / "e.png").exists()
    assert cli.main(["edit", cat, " ", "--out", str(tmp_path / "f.png"), "--size", "32x32", *common]) == 0
    assert "the instruction is empty" in capsys.readouterr().err and (tmp_path / "f.png").exists()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {cat}\nthe cat\nor\n"))
    assert cli.main(["chat", "--out-dir", str(tmp_path / "chat"), "--max-new-tokens", "4", *common]) == 0
    assert capsys.readouterr().out.count("assistant:") == 2
    # a picture that is not there is not attached, a turn past the model's length is left out: the chat goes on
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {tmp_path / 'nope.png'}\n/image {cat}\nthe cat\n"
                                                 f"{'the ' * 20000}\nor\n"))
    assert cli.main(["chat", "--out-dir", str(tmp_path / "chat"), "--max-new-tokens", "4", *common]) == 0
    out, err = capsys.readouterr()
    assert out.count("assistant:") == 2 and "nope.png: no such file" in err and "left out" in err
    # commands: '/help' shows them, an unknown one or '/image' without a path is reported and nothing is
    # sent; '//' sends a message that starts with '/'
    monkeypatch.setattr("sys.stdin",
                        io.StringIO(f"/help\n/image\n/hepl me\n//image is a word\nthe cat\n/image {cat}\n"))
    assert cli.main(["chat", "--out-dir", str(tmp_path / "chat"), "--max-new-tokens", "4", *common]) == 0
    out, err = capsys.readouterr()
    assert out.count("assistant:") == 2 and err.count("'/help' shows this") == 2
    assert "unknown command '/hepl' (nothing sent)" in err and "'/image' needs the path" in err
    assert f"ended with 1 attached picture(s) no message took: {cat}" in err
    # '/reset' starts over: the same first message gets the same sampled answer (a turn's seed and its
    # history both follow the conversation's length), and the model is not reloaded
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {cat}\nthe cat\n/reset\n/image {cat}\nthe cat\n"))
    assert cli.main(["chat", "--out-dir", str(tmp_path / "chat"), "--max-new-tokens", "4", "--temperature", "1",
                     *common]) == 0
    out, err = capsys.readouterr()
    first, again = [line for line in out.splitlines() if line.startswith("assistant:")]
    assert first == again and "chat: a new conversation" in err
    # without --max-new-tokens a turn gets the pipeline's chat budget (the CLI's other verbs: 256)
    asked = []
    monkeypatch.setattr(UniTokenPipeline, "chat", lambda self, m, i, **options: asked.append(options) or ["ok"])
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n"))
    assert cli.main(["chat", "--out-dir", str(tmp_path / "chat"), *common]) == 0
    # (2,048, the reference's free-form demo's: room for a 512 x 512 picture, 3 + 32 x 33 + 1 tokens)
    assert asked[0]["max_new_tokens"] == pipe.chat_request([{"from": "human", "value": "hi"}]).max_new_tokens == 2048
    # '/draw CAPTION' sends the generation prompt at --size (a line cannot hold its newline); without a
    # caption nothing is sent; a size that is not whole grid units is refused before the model loads
    asked.clear()
    monkeypatch.setattr(UniTokenPipeline, "chat", lambda self, m, i, **options: asked.append(m[-1]) or ["ok"])
    monkeypatch.setattr("sys.stdin", io.StringIO("/draw\n/draw  a red cat \n"))
    assert cli.main(["chat", "--out-dir", str(tmp_path / "chat"), "--size", "64x32", *common]) == 0
    assert asked == [{"from": "human",  # the reference's own prompt for its released models
                      "value": "Generate an image according to the following prompt:\na red cat"}]
    assert "'/draw' needs a caption (nothing sent)" in capsys.readouterr().err
    assert cli.main(["chat", "--out-dir", str(tmp_path / "chat"), "--size", "50x64", *common]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n"))
    # by their options (it said cfg_scale, which no flag is), before the model loads
    for option, value in (("--cfg", "-2"), ("--temperature", "-1")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["chat", "--out-dir", str(tmp_path / "chat"), option, value, *common])
        assert stop.value.code == 2 and f"argument {option}: {value} is out of range" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")  # said before a model loads (no model is there), not as "File exists"
    assert cli.main(["chat", "--out-dir", str(tmp_path / "a-file"), "--model", str(tmp_path / "no-model")]) == 2
    assert f"--out-dir {tmp_path / 'a-file'} is a file" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--out", str(tmp_path / "x.png"), "--size", "7x7", *common]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    # options outside their range are refused with the option's name, never read as another setting
    # (issue 15: a negative temperature ran greedy, a negative top-k ran without one, and so on)
    out = ["--out", str(tmp_path / "y.png"), "--size", "32x32"]
    # (counts and seeds: argparse, below)
    for extra, says in [(["--size", "0x0"], "positive"), (["--size=-64x64"], "positive"),
                        (["--image-prefix", "99999999"], "vocabulary"), (["--image-prefix", "abc"], "token ids"),
                        (["--size", "3200x3200"], "positions")]:
        assert cli.main(["generate", "x", *out, *common, *extra]) == 2, extra
        assert says in capsys.readouterr().err, extra
    assert not (tmp_path / "y.png").exists()
    for verb, extra in ((["generate", "x", *out], ["--temperature", "-1"]), (["generate", "x", *out], ["--cfg", "-1"]),
                        (["understand", cat, "q"], ["--temperature", "nan"])):  # (by option, before the model loads)
        with pytest.raises(SystemExit) as stop:
            cli.main([*verb, *common, *extra])
        assert stop.value.code == 2 and f"argument {extra[0]}: {extra[1]} is out of range" in capsys.readouterr().err
    # a question is required after the pictures; one question per call; outputs checked before drawing
    with pytest.raises(SystemExit) as stop:
        cli.main(["understand", cat, *common])
    assert stop.value.code == 2 and "required: QUESTION" in capsys.readouterr().err
    assert cli.main(["understand", cat, cat, *common]) == 2 and "is a file" in capsys.readouterr().err
    assert cli.main(["understand", cat, "q1", cat, "q2", *common]) == 2
    assert "not a picture file" in capsys.readouterr().err
    assert cli.main(["understand", str(tmp_path / "nope.png"), "q", *common]) == 2  # a path that is not there
    assert "nope.png: no such file" in capsys.readouterr().err
    assert cli.main(["understand", str(tmp_path), "q", *common]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--out", str(tmp_path / "missing" / "x.png"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--out", str(tmp_path / "x.txt"), *common]) == 2  # before drawing
    said = capsys.readouterr().err
    assert "is not a format PIL writes colour pictures in" in said and not (tmp_path / "x.txt").exists()
    # counts and seeds out of range stop the command before a model loads (this one does not exist)
    for option, value, said in (("--n", "0", "at least 1"), ("--seed", "-1", "in [0, 4294967295]"),
                                ("--seed", str(2 ** 32), "4294967296 is out of range"),
                                ("--batch-size", "two", "'two' is not a whole number"), ("--top-k", "-5", "[0, ")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["generate", "x", "--out", str(tmp_path / "z.png"), option, value, "--model",
                      str(tmp_path / "no-model")])
        assert stop.value.code == 2 and f"argument {option}: " in (err := capsys.readouterr().err) and said in err, err
    with pytest.raises(SystemExit) as stop:
        cli.main(["understand", cat, "q", "--max-new-tokens", "0", "--model", str(tmp_path / "no-model")])
    assert stop.value.code == 2 and "argument --max-new-tokens: 0 is out of range" in capsys.readouterr().err
    # so do pictures that cannot be read (the model named does not exist: it was never reached)
    (tmp_path / "notes.png").write_text("not a picture")
    for verb in (["understand", str(tmp_path / "notes.png"), "q"],
                 ["edit", str(tmp_path / "notes.png"), "make it red", "--out", str(tmp_path / "e.png")]):
        assert cli.main([*verb, "--model", str(tmp_path / "no-model")]) == 2, verb
        assert "notes.png: not an image file PIL can read" in capsys.readouterr().err, verb
    # a prompts file that cannot be read, and a captions file that is a folder, are said in one line, by option
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for where, said in ((tmp_path / "absent.txt", "No such file"), (tmp_path, "Is a directory"),
                        (tmp_path / "latin1.txt", "is not UTF-8 text")):
        assert cli.main(["generate", "--prompts-file", str(where), "--out", str(tmp_path), "--model",
                         str(tmp_path / "no-model")]) == 2, where
        assert f"unitoken generate: error: --prompts-file {where}" in (err := capsys.readouterr().err) and said in err
    (tmp_path / "captions.json").mkdir()
    assert cli.main(["caption", cat, "--out", str(tmp_path / "captions.json"), "--model",
                     str(tmp_path / "no-model")]) == 2
    assert "captions.json is a directory" in capsys.readouterr().err
    assert cli.main(["convert", "--from", str(tmp_path / "nonexistent"), "--to", str(tmp_path / "c")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # without --image-prefix / --vq-size: the defaults come from the model, not the 7B release
    own = [a for a in common if a not in ("--image-prefix", "", "--vq-size", "32")]
    assert cli.main(["understand", cat, "the cat is", "--max-new-tokens", "2", *own]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # the installed distribution's version (there was no --version)
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"unitoken-jax {importlib.metadata.version('unitoken-jax')}"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    page = capsys.readouterr().out
    assert re.search(r"\(default:\s+3\.0\)", page)  # help pages show their defaults, where they say something
    assert "default: None" not in page and "default: False" not in page
    with pytest.raises(SystemExit) as stop:  # options are never abbreviated: --image is not --image-prefix
        cli.main(["chat", "--image", cat, *common])
    assert stop.value.code == 2 and "unrecognized arguments: --image" in capsys.readouterr().err


def test_understand_s_usage_is_pictures_then_one_question(monkeypatch, capsys):
    """Its usage read `IMAGE... QUESTION [IMAGE... QUESTION ...]`, as if it took several pairs
    (refused: one question), and an option between the pictures and the question was refused."""
    from unitoken_jax import cli

    seen = []
    monkeypatch.setattr(cli, "_understand", lambda args: seen.append(args.inputs) or 0)
    assert cli.main(["understand", "a.png", "--seed", "3", "What is it?"]) == 0
    assert cli.main(["understand", "a.png", "b.png", "What is it?", "--seed", "3"]) == 0
    assert cli.main(["understand", "a.png", "b.png", "--seed", "3", "What is it?"]) == 0
    assert seen == [["a.png", "What is it?"]] + [["a.png", "b.png", "What is it?"]] * 2
    with pytest.raises(SystemExit):
        cli.main(["understand", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "IMAGE [IMAGE ...] QUESTION" in usage and "QUESTION [" not in usage, usage


def test_ctrl_c_stops_a_verb_with_a_line_and_exit_130(monkeypatch, capsys):
    from unitoken_jax import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_caption", interrupted)
    assert cli.main(["caption", "x.png", "--out", "c.jsonl"]) == 130
    err = capsys.readouterr().err
    assert "unitoken caption: stopped (Ctrl-C; with a .jsonl --out, a rerun goes on" in err and "Traceback" not in err


def test_the_drawing_verbs_take_the_prompts_template_from_the_command_line(tmp_path, monkeypatch, capsys):
    """A model trained with another drawing prompt than the reference's could not be asked for
    pictures in its own wording from the command line (only `UniTokenPipeline(generate_template=)`)."""
    from PIL import Image

    from unitoken_jax import cli
    from unitoken_jax.inference.pipeline import UniTokenPipeline
    from unitoken_jax.world import default

    out = str(tmp_path / "x.png")
    with monkeypatch.context() as m:  # a bad one is refused by its option, before the model loads
        m.setattr(default, "pipeline", lambda **_: pytest.fail("the model was loaded"))
        assert cli.main(["generate", "x", "--out", out, "--template", "Draw {promt}"]) == 2
        assert "error: --template: a drawing template may name only {prompt}" in capsys.readouterr().err
    asked = []

    def draw(self, prompt, **options):
        asked.append(self.generate_template.format(w=64, h=64, prompt=prompt))
        return [Image.new("RGB", (64, 64))]

    monkeypatch.setattr(UniTokenPipeline, "generate_image", draw)
    assert cli.main(["generate", "a red circle", "--out", out, "--template", "Draw this ({w}x{h}): {prompt}"]) == 0
    assert asked == ["Draw this (64x64): a red circle"]
    for verb in ("chat", "serve"):
        with pytest.raises(SystemExit):
            cli.main([verb, "--help"])
        assert "--template TEMPLATE" in capsys.readouterr().out, verb


def test_the_command_lines_say_bad_values_by_option_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """A temperature of -1, --cache-growth 0 and a negative prompt with --cfg 1 were refused after the
    model loaded, by Python's names (temperature=-1.0, cfg=1); serve's --max-body-mb 0 as
    max_body_bytes; a single prompt's Ctrl-C hinted at --prompts-file; `unitoken train --config X
    --help` printed absl's empty stub (exit 1); the world scripts gave tracebacks for a --workdir
    that is a file and a --model that is not there, and took abbreviated options."""
    from unitoken_jax import cli
    from unitoken_jax.world import build, evaluate, finetune_demo

    monkeypatch.setattr(cli, "_pipeline", lambda args: pytest.fail("the model was loaded"))
    for argv, says in ((["understand", "a.png", "q", "--temperature", "-1"],
                        "argument --temperature: -1 is out of range"),
                       (["understand", "a.png", "q", "--cache-growth", "0"], "argument --cache-growth: 0 is out of"),
                       (["generate", "x", "--out", "x.png", "--cfg", "nan"], "argument --cfg: nan is out of range"),
                       (["serve", "--max-body-mb", "0"], "argument --max-body-mb: 0 is out of range"),
                       (["serve", "--max-batch", "0"], "argument --max-batch: 0 is out of range")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2 and says in capsys.readouterr().err, argv
    out = str(tmp_path / "x.png")
    for argv in (["generate", "x", "--out", out, "--negative-prompt", "blue", "--cfg", "1"],
                 ["edit", "a.png", "make it red", "--out", out, "--negative-prompt", "blue", "--cfg", "1"]):
        assert cli.main(argv) == 2
        assert "--negative-prompt acts only through guidance, and --cfg 1 is none" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_pipeline", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["generate", "a red circle", "--out", out]) == 130
    said = capsys.readouterr().err
    assert "unitoken generate: stopped (Ctrl-C)" in said and "--prompts-file" not in said, said
    assert cli.main(["train", "--config", "stage2.py:tiny", "--help"]) == 0
    assert "Runs one training stage" in capsys.readouterr().out
    # its usage errors as the other verbs' (absl's "FATAL Flags parsing error", exit 1), and under its
    # own name (some of its lines said "unitoken_jax.train")
    for argv, says in ((["train", "--bogus"], "unitoken train: error: Unknown command line flag 'bogus' (--help "
                                              "lists the flags)"),
                       (["train"], "unitoken train: error: --config is required; --workdir is required"),
                       (["train", "--config", "stage2.py:tiny", "--workdir", str(tmp_path / "w"), "--process_id=1"],
                        "unitoken train: --process_id act only with --coordinator")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        said = (capsys.readouterr().err + str(stop.value.code)).strip()
        assert (stop.value.code == 2 or isinstance(stop.value.code, str)) and said.startswith(says), (argv, said)
    (tmp_path / "a-file").write_text("")
    # (34: the demo's question ids are fru0, fru1, ...; fru33 is the first whose BLAKE2b falls in the 5 % held out)
    import hashlib

    assert next(i for i in range(1000) if int.from_bytes(hashlib.blake2b(f"fru{i}".encode(), digest_size=8).digest(),
                                                         "big") < 0.05 * 2**64) == 33
    for main, argv, says in ((finetune_demo.main, ["--workdir", str(tmp_path / "a-file")],
                              "is a file; give a directory"),
                             # (too few pictures to hold any question out: a traceback a minute in)
                             (finetune_demo.main, ["--workdir", str(tmp_path / "w"), "--pictures", "20",
                                                   "--english-pictures", "0"],
                              "--pictures 20 with --english-pictures 0 hold out no question for the run's evaluation "
                              "(5% of the samples, by sample id); give --pictures 34 or more"),
                             (evaluate.main, ["--model", str(tmp_path / "none"), "--vqgan", str(tmp_path / "none")],
                              "--model " + str(tmp_path / "none") + ": no such directory"),
                             (build.main, ["--workdir", str(tmp_path / "w"), "--vq", "5"],
                              "unrecognized arguments: --vq")):
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err, argv
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_ctrl_c_while_the_first_call_compiles_exits_130(tmp_path):
    """The `unitoken` command stopped by Ctrl-C while XLA compiled or ran its first call printed its
    line and then, about every other time, crashed in the interpreter's teardown: exit 139 (a
    segfault), not the 130 promised. Eight interrupts at different moments must all give 130 (with
    the old exit about half of them crashed: all eight passing by chance is under 1 in 100)."""
    import signal
    import subprocess
    import sys

    from unitoken_jax.world import shapes

    picture = str(tmp_path / "red.png")
    shapes.draw([shapes.Thing("red", "circle", "top left")]).save(picture)
    env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path))
    for delay in (0.2, 0.5, 0.8, 1.1, 1.5, 2.0, 2.5, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "unitoken_jax.cli", "understand", picture,
                                 "What shape is this?", "--compilation-cache", "off"], stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
        seen = ""
        for line in proc.stderr:  # the last line before the first compile
            seen += line
            if "it computes in" in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        seen += proc.stderr.read()
        answer = proc.stdout.read()
        proc.wait(timeout=120)
        if answer.strip():  # done before the signal came (0), or it came in the teardown, which takes it (-2),
            # or between the answer's line and the command's end, which says it stopped (130)
            assert proc.returncode in (0, -signal.SIGINT, 130), (delay, proc.returncode, seen[-2000:])
            assert "Traceback" not in seen and "Fatal Python error" not in seen, seen[-2000:]
            continue
        assert proc.returncode == 130, (delay, proc.returncode, seen[-2000:])
        assert "stopped (Ctrl-C)" in seen and "Traceback" not in seen and "Fatal Python error" not in seen, \
            seen[-2000:]


@pytest.mark.slow
def test_ctrl_c_in_the_commands_first_second_stops_it_and_a_sigterm_is_said_and_cleaned_up(tmp_path):
    """A Ctrl-C while `unitoken` imported JAX (its first second or two) was raised inside JAX's
    garbage-collector callback, where Python prints it as ignored: the command ran to its end, exit 0
    (8 of 9 tries in a review). A SIGTERM killed a verb on the spot: no line, and a picture's
    temporary file left for good."""
    import signal
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path))
    command = [sys.executable, "-m", "unitoken_jax.console"]
    for delay in (0.3, 0.5, 0.7, 0.9, 1.2):
        proc = subprocess.Popen([*command, "init", "--to", str(tmp_path / f"ck{delay}")], stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (delay, proc.returncode, err[-2000:])
        assert "stopped (Ctrl-C)" in err and "Traceback" not in err, (delay, err[-2000:])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top left\n" * 2000)
    out = tmp_path / "drawn"
    proc = subprocess.Popen([*command, "generate", "--prompts-file", str(prompts), "--out", str(out),
                             "--batch-size", "2"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=str(tmp_path))
    deadline = time.time() + 240
    while len(list(out.glob("*.png"))) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert "unitoken generate: stopped (SIGTERM; with --prompts-file, a rerun draws only" in err, err[-2000:]
    assert not list(out.glob("*.tmp")), list(out.glob("*.tmp"))
    import json

    listed = [p for entry in json.loads((out / "index.json").read_text()) for p in entry["pictures"]]
    assert sorted(listed) == sorted(p.name for p in out.glob("*.png")) and len(listed) < 2000


def test_the_python_api_refuses_what_is_not_a_prompt_or_a_size_and_runs_an_empty_batch_to_nothing(pipe, monkeypatch):
    """Bad arguments are said by name before anything runs (they had failed deep inside: "'NoneType'
    object is not iterable", "too many values to unpack", "max() arg is an empty sequence", and an
    empty chat was called a conversation that starts with the assistant)."""
    monkeypatch.setattr(pipe.decode_loop, "generate", lambda *a, **k: pytest.fail("nothing should run"))
    assert pipe.generate_image([], size=(32, 32)) == [] and pipe.understand([], []) == [] and pipe.run([]) == []
    for prompt in (None, 5, ["a cat", None]):
        with pytest.raises(TypeError, match="prompt must be a string"):
            pipe.generate_image(prompt, size=(32, 32))
    with pytest.raises(TypeError, match="question must be a string"):
        pipe.understand([[]], [7])
    for size in ("64x64", (64,), 64):
        with pytest.raises(ValueError, match=r"size must be \(width, height\)"):
            pipe.generate_image("a cat", size=size)
        with pytest.raises(ValueError, match=r"size must be \(width, height\)"):
            pipe.edit(str(pipe.image_dir / "cat.png"), "make it red", size=size)
    assert pipe.generate_request("a cat", size=np.array([64, 32])).grid_hw == (1, 2)  # any pair: (width, height)
    for messages in ([], "hello", {"from": "human", "value": "hi"}):
        with pytest.raises(ValueError, match="messages must be a list of turns"):
            pipe.chat(messages)
    # the mark of a picture's place is not text: it had been read as a picture (or failed later as
    # "1 <|image|> placeholders but 0 images")
    cat = str(pipe.image_dir / "cat.png")
    for call, what in ((lambda: pipe.understand([cat], 'is this a <|image|> tag?'), "question"),
                       (lambda: pipe.generate_image("a sign that reads <|image|>", size=(32, 32)), "prompt"),
                       (lambda: pipe.edit(cat, "write <|image|> on it", size=(32, 32)), "instruction")):
        with pytest.raises(ValueError, match=f"the {what} contains '<\\|image\\|>', the mark of where a picture"):
            call()


def test_a_picture_requests_sampling_options_are_the_codes_and_a_negative_prompt_needs_guidance(pipe):
    """`temperature`, `top_k` and `top_p` given to a picture request set its code sampling (they
    had set the text sampling a picture never does, silently); with their `image_` names as well
    it is an error, and so is a negative prompt where cfg=1 turns guidance off."""
    from unitoken_jax.inference.pipeline import NegativePromptError

    for name, value in (("temperature", 0.5), ("top_k", 7), ("top_p", 0.5)):
        request = pipe.generate_request("he is", size=(32, 32), **{name: value})
        assert getattr(request, "image_" + name) == value and getattr(request, name) == getattr(Request, name)
        with pytest.raises(ValueError, match=f"{name} and image_{name} both given"):
            pipe.edit_request(str(pipe.image_dir / "cat.png"), "he", size=(32, 32), **{name: value,
                                                                                        "image_" + name: value})
    greedy = pipe.generate_image("he is", size=(64, 32), temperature=0, progress=False)
    assert np.array_equal(np.asarray(greedy[0]), np.asarray(
        pipe.generate_image("he is", size=(64, 32), image_temperature=0, seed=9, progress=False)[0]))
    with pytest.raises(NegativePromptError, match="cfg=1 is none"):
        pipe.generate_request("he is", size=(32, 32), cfg=1, negative_prompt="or")


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("image_temperature", float("nan")), ("top_k", -5), ("image_top_k", 2.5),
    ("top_p", 0.0), ("image_top_p", -1.0), ("top_p", 1.5), ("cfg_scale", -1.0), ("seed", 2 ** 32), ("seed", -1),
    ("max_new_tokens", 0), ("max_new_tokens", -1), ("grid_hw", (0, 2)), ("grid_hw", (2, 40)), ("temperature", True),
    ("max_grid", 96),  # grid sizes stop at 95 (layout.MAX_GRID): a 96 would be drawn and then not be read
])
def test_request_options_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Request(tokens=np.array([1, 2]), **{field: value})
    Request(tokens=np.array([1, 2]), temperature=0.0, top_k=0, top_p=1.0, cfg_scale=0.0, seed=2 ** 32 - 1)  # edges


def test_a_refusal_states_the_range_exactly():
    """Integer bounds in full (a seed's top is 4294967295, not 4.29497e+09), a number's as written."""
    with pytest.raises(ValueError, match=re.escape("seed=-1 is out of range: it must be [0, 4294967295]")):
        Request(tokens=np.array([1, 2]), seed=-1)
    with pytest.raises(ValueError, match=re.escape("top_k=2147483648 is out of range: it must be [0, 2147483647]")):
        Request(tokens=np.array([1, 2]), top_k=2 ** 31)
    with pytest.raises(ValueError, match=re.escape("top_p=1.5 is out of range: it must be (0, 1]")):
        Request(tokens=np.array([1, 2]), top_p=1.5)
    with pytest.raises(ValueError, match=re.escape("max_new_tokens=0 is out of range: it must be at least 1")):
        Request(tokens=np.array([1, 2]), max_new_tokens=0)


def test_a_picture_s_refusal_names_the_option_as_the_caller_gave_it(pipe):
    """generate_image / edit take `cfg`, `temperature`, `top_k`, `top_p`; a bad value was refused as
    cfg_scale=..., image_temperature=... (the Request's names, which the caller never wrote)."""
    picture = Image.new("RGB", (32, 32))
    for option, value in (("cfg", -1.0), ("temperature", -1.0), ("top_k", -1), ("top_p", 2.0), ("image_top_k", -1)):
        for call in (lambda **o: pipe.generate_image(["a red circle"], size=(32, 32), **o),
                     lambda **o: pipe.edit(picture, "make it blue", size=(32, 32), **o)):
            with pytest.raises(ValueError, match=rf"^{option}={value!r} is out of range"):
                call(**{option: value})


def test_pipeline_refuses_bad_sizes_counts_and_prefixes(pipe):
    with pytest.raises(ValueError, match="vocabulary"):
        pipe.image_prefix = [99999999]
    with pytest.raises(ValueError, match="integers"):
        pipe.image_prefix = ["16853"]
    for size in [(0, 0), (-64, 64), (32.5, 32), (float("nan"), 32)]:  # (a whole float is its number)
        with pytest.raises(ValueError, match="positive"):
            pipe.generate_request("x", size=size)
    with pytest.raises(ValueError, match="positions"):
        pipe.generate_request("x", size=(100000 * 32, 32))
    # a negative prompt's row runs beside the prompt's: it too must leave the picture's positions
    need = layout.generated_image_length((1, 1)) - 1  # after its <racm3:break>

    def partner(text):  # the negative prompt's row: its conversation, the image prefix and <racm3:break>
        turns = [{"from": "human", "value": text}, {"from": "gpt", "value": None}]
        return len(pipe._encode({"conversations": turns})["tokens"]) + len(pipe.image_prefix) + 1

    words = 1
    while partner("cat " * words) + need <= pipe.max_length:
        words += 1
    pipe.generate_request("x", size=(32, 32), negative_prompt="cat " * (words - 1))  # the longest that fits
    with pytest.raises(ValueError, match=f"the negative prompt and a 32x32 picture need .* the model takes "
                                         f"{pipe.max_length}"):
        pipe.generate_request("x", size=(32, 32), negative_prompt="cat " * words)
    with pytest.raises(ValueError, match="at least 1"):
        pipe.generate_image("x", size=(32, 32), n=0)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(pipe):
    small = dataclasses.replace(pipe.model.config.decoder, vocab_size=pipe.tokenizer.vocab_size - 1)
    model = unitoken_jax.UniTokenModel.random(pipe.model.config.replace(decoder=small), seed=0)
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        UniTokenPipeline(model, pipe.tokenizer, pipe.vq, vq_size=32)


def test_every_vqgan_format_loads_through_one_entry(pipe, tmp_path):
    """`--vqgan` everywhere takes each format the package reads (reconstruct took only Meta's)."""
    save_vqgan(str(tmp_path / "ours"), pipe.vq.config, pipe.vq.params)
    vq = VQTokenizer.load(str(tmp_path / "ours"))
    assert vq.config == pipe.vq.config
    # our format damaged: a bare SafetensorError (the file unnamed) or a mismatch naming no tensor before
    import shutil

    from safetensors.numpy import load_file, save_file

    from unitoken_jax.convert.files import CheckpointError

    weights = next((tmp_path / "ours").glob("*.safetensors"))
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "ours", damaged)
    (damaged / weights.name).write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"cannot read {re.escape(str(damaged / weights.name))}"):
        VQTokenizer.load(str(damaged))
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != first}, str(damaged / weights.name))
    with pytest.raises(CheckpointError, match=f"missing {re.escape(first)}; 1 missing, 0 unknown"):
        VQTokenizer.load(str(damaged))
    (damaged / weights.name).unlink()
    with pytest.raises(CheckpointError, match=f"has no {weights.name}"):
        VQTokenizer.load(str(damaged))
    with pytest.raises(FileNotFoundError):
        VQTokenizer.load(str(tmp_path / "nothing.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no VQ-GAN"):
        VQTokenizer.load(str(tmp_path / "empty"))
    from unitoken_jax import cli

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "red.png")
    assert cli.main(["reconstruct", str(tmp_path / "red.png"), "--vqgan", str(tmp_path / "ours"), "--size", "32",
                     "--out", str(tmp_path / "back.png")]) == 0
    assert Image.open(tmp_path / "back.png").size == (32, 32)


def test_a_drawing_template_without_its_prompt_or_with_other_fields_is_refused(pipe):
    """A template without {prompt} drew from the template alone, silently; one naming another field
    failed with a KeyError at the first picture."""
    for template, says in (("Draw something nice", "needs {prompt}"), ("{prompt} in {style}", "may name only"),
                           ("Draw {{prompt}}", "needs {prompt}")):  # (a literal '{prompt}': the prompt left out)
        with pytest.raises(ValueError, match=re.escape(says)):
            UniTokenPipeline(pipe.model, pipe.tokenizer, pipe.vq, vq_size=32, image_prefix=(),
                             generate_template=template)
    sized = UniTokenPipeline(pipe.model, pipe.tokenizer, pipe.vq, vq_size=32, image_prefix=(),
                             generate_template="{{draw}} {w}x{h}: {prompt}")  # (a brace written doubled)
    assert UniTokenPipeline(pipe.model, pipe.tokenizer, pipe.vq, vq_size=32, image_prefix=(),
                            generate_template="Draw {prompt!s}").generate_template == "Draw {prompt!s}"
    text = pipe.tokenizer.encode_text("{draw} 64x32: a cat")
    tokens = sized.generate_request("a cat", size=(64, 32)).tokens.tolist()
    assert tokens[1:len(text) + 2] == text + [8710]  # BOS, the filled template, the end of the turn


def test_every_cut_answer_warns_at_the_callers_own_line(pipe):
    """A cut answer's warning blamed a line inside the library for `understand` (a fixed stack
    level; `run` called directly blamed the frame above the caller's), and Python's default filter
    shows a warning once a place: from the second call on, cut answers were silent. Here, with
    only the package's own filters (as in a fresh session), each of three cut answers from one
    line warns, at that line, through `understand`, its batches and `run`; a caller's "once" filter
    still shows it once."""
    import warnings

    from unitoken_jax.inference.pipeline import AnswerCut

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # no filter: Python's default action, which shows a warning once a place
        calls = (lambda: pipe.understand([], "he is", max_new_tokens=2, stop_tokens=()),
                 lambda: pipe.understand([[], []], ["he is", "she is"], max_new_tokens=2, stop_tokens=(),
                                         batch_size=1, progress=False),
                 lambda: pipe.run([pipe.understand_request([], "he is", max_new_tokens=2, stop_tokens=())]))
        for call in calls:
            for _ in range(3):
                call()
    cut = [w for w in caught if issubclass(w.category, AnswerCut)]
    assert len(cut) == 9, [str(w.message) for w in caught]
    assert {(w.filename, w.lineno) for w in cut} == {(__file__, calls[0].__code__.co_firstlineno + i)
                                                     for i in (0, 1, 3)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("once", AnswerCut)
        for _ in range(3):
            calls[0]()
    assert len([w for w in caught if issubclass(w.category, AnswerCut)]) == 1


def test_the_pipelines_numbers_and_odd_calls(pipe):
    """Whole floats were refused for n, size and batch_size (the README: "NumPy integers and whole
    floats are taken as the numbers they are"); an unknown keyword was a TypeError naming
    `Request.__init__`; a path with a list of questions was taken apart into characters ("2
    questions and 26 lists of pictures"); `edit` of one instruction refused its picture in a list
    of one; `understand` had no `progress`."""
    cat = pipe.understand_request
    assert pipe.generate_request("a cat", size=(32.0, np.int64(64))).grid_hw == (2, 1)
    drawn = pipe.generate_image("a cat", size=(32, 32), n=2.0, batch_size=1.0, progress=False)
    assert len(drawn) == 2 and all(isinstance(p, Image.Image) for p in drawn)
    for call, says in ((lambda: pipe.understand([], "hi", max_new_tokens=2, colour=1), "unexpected keyword argument "
                        "'colour'; the options a request takes: max_new_tokens, seed, temperature"),
                       (lambda: pipe.generate_image("a cat", stream=print), "unexpected keyword argument 'stream'"),
                       (lambda: pipe.generate_image("a cat", cfg_scale=2), "cfg_scale is set by cfg= here")):
        with pytest.raises(TypeError, match=re.escape(says)):
            call()
    with pytest.raises(ValueError, match=re.escape("2 questions and one picture (str): give one list of pictures")):
        pipe.understand("cat.png", ["q1", "q2"])
    picture = Image.new("RGB", (40, 40), (200, 30, 30))
    one = pipe.edit(picture, "make it blue", size=(32, 32), progress=False)
    assert np.array_equal(np.asarray(pipe.edit([picture], "make it blue", size=(32, 32), progress=False)),
                          np.asarray(one))
    with pytest.raises(ValueError, match="one instruction and 2 pictures: an edit takes one picture"):
        pipe.edit([picture, picture], "make it blue", size=(32, 32))
    assert pipe.understand([], "hi", max_new_tokens=2, progress=False) == pipe.understand([], "hi", max_new_tokens=2)
    assert cat([], "hi").max_new_tokens == 256


def test_a_picture_grid_takes_arrays_and_refuses_no_columns():
    from unitoken_jax.inference.pipeline import picture_grid

    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    grid_ = picture_grid([red, Image.new("RGB", (8, 8), (0, 0, 255))], gap=0)
    assert grid_.size == (16, 8) and grid_.getpixel((0, 0)) == (255, 0, 0) and grid_.getpixel((15, 0)) == (0, 0, 255)
    assert picture_grid([red] * 4, columns=2.0, gap=0).size == (16, 16)
    with pytest.raises(ValueError, match="columns must be a whole number, at least 1"):
        picture_grid([red], columns=0)


def test_a_chats_picture_that_cannot_be_saved_is_said_once_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    """`unitoken chat` saves each picture drawn as chat_N.png, numbered past those there; one that
    cannot be saved (no such folder, a full disk) is said in one line and the chat goes on, leaving
    no empty or cut file under the name it had taken."""
    import errno

    from PIL import Image

    from unitoken_jax import cli

    picture = Image.new("RGB", (4, 4), "red")
    (tmp_path / "chat_0.png").write_bytes(b"another chat's")
    assert cli._save_drawn(picture, str(tmp_path), 0) == (str(tmp_path / "chat_1.png"), 2)
    assert Image.open(tmp_path / "chat_1.png").size == (4, 4)
    assert (tmp_path / "chat_0.png").read_bytes() == b"another chat's"
    assert cli._save_drawn(picture, str(tmp_path / "gone"), 2) == (None, 3)
    said = capsys.readouterr().err.splitlines()
    assert said == [f"chat: the picture was not saved: {tmp_path / 'gone' / 'chat_2.png'}: No such file or directory"]

    def full(picture, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli, "_save", full)
    assert cli._save_drawn(picture, str(tmp_path), 3) == (None, 4)
    assert capsys.readouterr().err.splitlines() == [
        f"chat: the picture was not saved: {tmp_path / 'chat_3.png'}: No space left on device"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat_0.png", "chat_1.png"]  # (chat_3.png not left empty)
