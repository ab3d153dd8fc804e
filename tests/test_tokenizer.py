"""Text tokenizer, code <-> BPE translation, the image token layout and the conversation format."""

import pathlib
import re

import numpy as np
import pytest
from tokenizers import Tokenizer

import tokenizer_fixture
from unitoken_jax.tokenizer import layout
from unitoken_jax.tokenizer.anyres import NEWLINE_ENTRY
from unitoken_jax.tokenizer.conversation import (ConversationError, ImageInput, SequenceTooLong, TextStream,
                                                 decode, encode_conversation, encode_item)
from unitoken_jax.tokenizer.text import TextTokenizer, TokenizerError

EOT, SEP, BREAK, EOSS, NL = 8710, 8198, 8197, 8196, 8803


@pytest.fixture(scope="module")
def spec():
    return tokenizer_fixture.build()


@pytest.fixture(scope="module")
def tok(spec):
    return TextTokenizer(spec)


def test_code_map_is_the_vocabulary_permutation(tok, spec):
    vocab = Tokenizer.from_str(spec).get_vocab()
    codes = np.array([0, 1, 7, 123, 8191])
    ids = tok.codes_to_ids(codes)
    assert [vocab[tokenizer_fixture.code_name(c)] for c in codes] == ids.tolist()
    assert not np.array_equal(ids, codes + 4)  # a permutation, not an offset
    assert sorted(tok.code_to_bpe.tolist()) == list(range(4, 8196))
    all_codes = np.arange(8192)
    np.testing.assert_array_equal(tok.ids_to_codes(tok.codes_to_ids(all_codes)), all_codes)
    with pytest.raises(ValueError, match="not image-code tokens"):
        tok.ids_to_codes([EOT])
    with pytest.raises(ValueError, match="0..8191"):
        tok.codes_to_ids([8192])


def test_wrong_control_ids_are_refused(spec):
    bad = spec.replace('"<racm3:break>"', '"<racm3:brake>"')
    with pytest.raises(TokenizerError, match="<racm3:break>"):
        TextTokenizer(bad)


def test_a_tokenizer_file_s_truncation_or_padding_never_reaches_the_text(tok, spec):
    """A tokenizer.json saved after a call that truncated or padded keeps those settings, and ours
    applied them: an answer cut to 8 ids, unsaid, or 14 pad ids inside a user turn. The reference
    encodes with truncation=False through transformers, which applies neither."""
    import json

    text = "the cat is on the mat and the dog is here"
    whole = tok.encode_text(text)
    assert len(whole) > 8
    for setting in ({"truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}},
                    {"padding": {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                                 "pad_id": 1, "pad_type_id": 0, "pad_token": "<pad>"}}):
        saved = TextTokenizer(json.dumps({**json.loads(spec), **setting}))
        assert saved.encode_text(text) == whole, setting


@pytest.mark.parametrize("text,special_in_hf", [
    ("<racm3:break>", True), ("<eoss>", True), ("<reserved08799>", True), ("<reserved08706>", True),
    ("<sentinel:0> and <s>", True), ("a <|Image|> b", False), ("<|image |>", False)])
def test_prompt_text_never_becomes_a_control_token(tok, spec, text, special_in_hf):
    full = Tokenizer.from_str(spec).encode(text, add_special_tokens=False).ids
    ours = tok.encode_text(text)
    controls = {BREAK, EOSS, NL, EOT, SEP, 0} | set(tok.code_to_bpe.tolist())
    assert not controls & set(ours)
    assert tok.decode_text(ours) == text
    # the plain HF call (what the reference does) turns the special strings into control ids
    assert bool(controls & set(full)) == special_in_hf


def test_text_only_conversation_equals_the_reference_full_string_encoding(tok, spec):
    item = {"conversations": [{"from": "human", "value": "the cat is here?"},
                              {"from": "gpt", "value": "he is there"},
                              {"from": "human", "value": "or not"}, {"from": "gpt", "value": "then"}]}
    enc = encode_conversation(item, [], tok)
    full = Tokenizer.from_str(spec)
    reference = [0] + full.encode("the cat is here?<reserved08706>he is there<reserved08706>or not<reserved08706>"
                                  "then<reserved08706>", add_special_tokens=False).ids
    assert enc.tokens.tolist() == reference
    e = tok.encode_text
    expected_labels = ([-100] * (1 + len(e("the cat is here?")) + 1) + e("he is there") + [EOT]
                       + [-100] * (len(e("or not")) + 1) + e("then") + [EOT])
    assert enc.labels.tolist() == expected_labels
    assert not enc.is_continuous.any()


def _image(codes, n_features, entries=None):
    return ImageInput(np.asarray(codes), np.arange(n_features) if entries is None else np.asarray(entries), n_features)


def test_two_prompt_images_and_a_generated_one_give_the_spec_layout(tok):
    # Codes of three 64x64 pictures (a 4x4 code grid = 2x2 grid units: grid token 8804 + 2).
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 8192, (4, 4)) for _ in range(3)]
    cont = [3, 3, 5]  # continuous features per image (tiny); the third one has an AnyRes-style newline
    images = [_image(codes[0], 3), _image(codes[1], 3), _image(codes[2], 4, [0, 1, NEWLINE_ENTRY, 2, 3])]
    item = {"conversations": [
        {"from": "human", "value": "<|image|>the<|image|> is"},
        {"from": "gpt", "value": "he"},
        {"from": "human", "value": "or"},
        {"from": "gpt", "value": "the <|image|>"}], "image": ["a.png", "b.png", "c.png"]}
    enc = encode_conversation(item, images, tok)
    e = tok.encode_text

    def img(k, predicted):
        ids = tok.codes_to_ids(codes[k])
        discrete = [BREAK, 8806, 8806]
        for row in ids:
            discrete += row.tolist() + [NL]
        n = cont[k]
        block = [0] * n if k < 2 else [0, 0, NL, 0, 0]
        toks = discrete + [SEP] + block + [EOSS]
        labs = (discrete if predicted else [-100] * len(discrete)) + [SEP] + [-100] * len(block) \
            + ([EOSS] if predicted else [-100])
        is_cont = [False] * (len(discrete) + 1) + [b == 0 for b in block] + [False]
        return toks, labs, is_cont

    expected_t, expected_l, expected_c = [0], [-100], [False]

    def add(t, l, c=None):
        expected_t.extend(t)
        expected_l.extend(l)
        expected_c.extend(c or [False] * len(t))

    add(*img(0, False))
    add(e("the"), [-100] * len(e("the")))
    add(*img(1, False))
    add(e(" is") + [EOT], [-100] * (len(e(" is")) + 1))
    add(e("he") + [EOT], e("he") + [EOT])
    add(e("or") + [EOT], [-100] * (len(e("or")) + 1))
    add(e("the "), e("the "))
    add(*img(2, True))
    add([EOT], [EOT])
    assert enc.tokens.tolist() == expected_t
    assert enc.labels.tolist() == expected_l
    assert enc.is_continuous.tolist() == expected_c
    # features: image 0 -> rows 0..2, image 1 -> 3..5, image 2 -> 6..9 of the item's feature list
    assert enc.feature_index[enc.is_continuous].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert enc.image_predicted == [False, False, True]
    assert [enc.tokens[s] for s, _ in enc.image_spans] == [BREAK] * 3
    assert [enc.tokens[t - 1] for _, t in enc.image_spans] == [EOSS] * 3


def test_images_without_placeholders_go_first_like_the_reference(tok):
    item = {"conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "he"}], "image": ["a"]}
    enc = encode_conversation(item, [_image(np.zeros((2, 2), int), 1)], tok)
    start, end = enc.image_spans[0]
    assert start == 1
    assert enc.tokens[end:end + len(tok.encode_text(" what"))].tolist() == tok.encode_text(" what")


def test_llavas_image_placeholder_in_training_data_is_the_tokenizers_own_image_token(tok, spec):
    """The reference encodes its training items with the tokenizer's added tokens active, so a
    LLaVA-style `<image>` beside the picture (which goes in front) is Chameleon's `<image>` token
    (8711 in the HF tokenizer); it was encoded as plain text here. Outside training data, and with
    a tokenizer that has no such token, it stays plain text."""
    import json

    hf = json.loads(spec)  # as transformers' Chameleon conversion names it: <reserved08707> -> <image>
    for entry in hf["added_tokens"]:
        if entry["id"] == 8711:
            entry["content"] = "<image>"
    hf["model"]["vocab"]["<image>"] = hf["model"]["vocab"].pop("<reserved08707>")
    hf_tok = TextTokenizer(json.dumps(hf))
    assert hf_tok.llava_image_id == 8711 and tok.llava_image_id is None
    item = {"conversations": [{"from": "human", "value": "<image>\nWhat is <image> here?"},
                              {"from": "gpt", "value": "the <image>"}], "image": ["a"]}
    enc = encode_conversation(item, [_image(np.zeros((2, 2), int), 1)], hf_tok, llava_image=True)
    _, end = enc.image_spans[0]
    oracle = Tokenizer.from_str(json.dumps(hf))  # the tokenizers library, its added tokens active
    question = oracle.encode(" <image>\nWhat is <image> here?", add_special_tokens=False).ids
    answer = oracle.encode("the <image>", add_special_tokens=False).ids
    assert question.count(8711) == 2 and answer.count(8711) == 1
    assert enc.tokens[end:].tolist() == question + [EOT] + answer + [EOT]
    assert enc.labels[end + len(question) + 1:].tolist() == answer + [EOT]
    plain = encode_conversation(item, [_image(np.zeros((2, 2), int), 1)], hf_tok)  # not training data: plain text
    assert 8711 not in plain.tokens.tolist()
    assert 8711 not in encode_conversation(item, [_image(np.zeros((2, 2), int), 1)], tok,
                                           llava_image=True).tokens.tolist()


def test_placeholder_count_must_match(tok):
    item = {"conversations": [{"from": "human", "value": "<|image|> and <|image|> and <|image|>"},
                              {"from": "gpt", "value": "ok"}]}
    with pytest.raises(ConversationError, match="3 <\\|image\\|> placeholders but 2 images$"):
        encode_conversation(item, [_image(np.zeros((2, 2), int), 1)] * 2, tok)
    # an edit pair written LLaVA's way: its '<image>' is words here, and the reason says so
    edit = {"conversations": [{"from": "human", "value": "<image>\nmake it blue"},
                              {"from": "gpt", "value": "<|image|>"}]}
    said = "1 <|image|> placeholders but 2 images (the 1 '<image>' in the text, LLaVA's mark, are read as words"
    with pytest.raises(ConversationError, match=re.escape(said)):
        encode_conversation(edit, [_image(np.zeros((2, 2), int), 1)] * 2, tok)


def test_bad_turns(tok):
    with pytest.raises(ConversationError, match="message 0 is from 'gpt', where a turn from 'human' or 'user' goes"):
        encode_conversation({"conversations": [{"from": "gpt", "value": "x"}]}, [], tok)
    # speakers' names in any case, as the reference lower-cases them ("Human" / "GPT" datasets)
    lower = {"conversations": [{"from": "human", "value": "the"}, {"from": "gpt", "value": "he"}]}
    upper = {"conversations": [{"from": "Human", "value": "the"}, {"from": "GPT", "value": "he"}]}
    assert encode_conversation(upper, [], tok).tokens.tolist() == encode_conversation(lower, [], tok).tokens.tolist()
    with pytest.raises(ConversationError, match="no 'conversations'"):
        encode_conversation({"image": []}, [], tok)
    with pytest.raises(ConversationError, match="message 0 has 'role' and 'content' \\(OpenAI's format\\)"):
        encode_conversation({"conversations": [{"role": "user", "content": "x"}]}, [], tok)
    with pytest.raises(ConversationError, match="nothing in the item is predicted"):
        encode_conversation({"conversations": [{"from": "human", "value": "x"}]}, [], tok)
    # a user's picture alone: its SEP is labelled (as in every turn), but nothing is there to answer
    with pytest.raises(ConversationError, match="nothing in the item is predicted"):
        encode_conversation({"conversations": [{"from": "human", "value": "<|image|> hi"}]},
                            [_image(np.zeros((2, 2), int), 1)], tok)


def test_generation_prompt_with_an_empty_last_turn(tok):
    item = {"conversations": [{"from": "human", "value": "the"}, {"from": "gpt", "value": None}]}
    enc = encode_conversation(item, [], tok)
    assert enc.tokens.tolist() == [0] + tok.encode_text("the") + [EOT]


def test_too_long_is_an_error_never_a_cut(tok):
    item = {"conversations": [{"from": "human", "value": "<|image|>"}, {"from": "gpt", "value": "he"}]}
    big = _image(np.zeros((32, 32), int), 729)  # a 512-px image: 3 + 32 * 33 + 1 (SEP) + 729 + 1 positions
    image_len = 3 + 32 * 33 + 1 + 729 + 1
    total = 1 + image_len + 1 + len(tok.encode_text("he")) + 1
    with pytest.raises(SequenceTooLong, match=f"image 1 alone takes {image_len} positions"):
        encode_conversation(item, [big], tok, max_length=1024)
    with pytest.raises(SequenceTooLong, match=f"the conversation takes {total} positions"):
        encode_conversation(item, [big], tok, max_length=total - 1)
    assert len(encode_conversation(item, [big], tok, max_length=total)) == total


# --- generated streams ----------------------------------------------------------------------------

def _stream(tok, codes):
    return layout.discrete_image_ids(tok.codes_to_ids(codes)) + [EOSS]


def test_decode_round_trip(tok):
    codes = np.random.default_rng(1).integers(0, 8192, (4, 6))
    ids = tok.encode_text("he is") + _stream(tok, codes) + tok.encode_text("the") + [EOT]
    parts = decode(ids, tok)
    assert parts[0] == "he is" and parts[2] == "the"
    np.testing.assert_array_equal(parts[1], codes)
    # the tokenizer's special tokens a model can draw in its text (`<s>`, `</s>`, `<reserved...>`) are
    # no text: left out, as transformers' skip_special_tokens does (the answers held "<reserved08743>")
    specials = [0, 2, 3, tok.token_id("<reserved08743>"), tok.token_id("<sentinel:0>")]
    ids = tok.encode_text("he ") + specials[:3] + tok.encode_text("is") + specials[3:] + [EOT]
    assert decode(ids, tok) == ["he is"]
    stream = TextStream(tok, [])
    assert stream.update(ids[:-1]) + stream.update(ids) == "he is"


def test_decode_reports_the_pictures_it_completes(tok):
    """A picture cut off by the budget is completed, and `repairs` says so (the pipeline warns with
    it); a whole one is not reported."""
    codes = np.random.default_rng(3).integers(0, 8192, (4, 6))
    whole = tok.encode_text("he is") + _stream(tok, codes)
    repairs = []
    decode(whole + [EOT], tok, repair=True, repairs=repairs)
    assert repairs == []
    cut = whole[:3 + 2 * 7 + 3]  # two rows and three codes of the third
    parts = decode(cut, tok, repair=True, repairs=repairs)
    np.testing.assert_array_equal(parts[1][:2], codes[:2])
    ((shape, changes),) = repairs
    assert shape == (4, 6) and any("no <eoss>" in c for c in changes)

    # cut off before its size (the budget ended at <racm3:break> or one grid token): nothing to
    # complete; the answer's text comes back and the picture is reported dropped, not raised
    text = whole[:whole.index(BREAK)]
    for tail in ([BREAK], [BREAK, whole[len(text) + 1]]):
        repairs = []
        assert decode(text + tail, tok, repair=True, repairs=repairs) == ["he is"]
        ((shape, changes),) = repairs
        assert shape is None and changes == [f"cut off after {len(tail)} of its ids, before its size: dropped"]
        with pytest.raises(layout.MalformedImageTokens, match="two grid tokens"):
            decode(text + tail, tok)


def test_a_picture_without_its_eoss_keeps_the_text_and_picture_after_it(tok):
    """Ids that lost a picture's <eoss> (made by hand, or cut and joined): the picture ends where
    its size tokens say, so the text after it stays text and a second picture stays a picture,
    instead of both being read as rows of the first."""
    rng = np.random.default_rng(4)
    first, second = rng.integers(0, 8192, (4, 6)), rng.integers(0, 8192, (2, 3 * 2))
    ids = (_stream(tok, first)[:-1] + tok.encode_text("the") + [layout.NEWLINE] + tok.encode_text("end")
           + _stream(tok, second) + [EOT])
    repairs = []
    parts = decode(ids, tok, repair=True, repairs=repairs)
    assert len(parts) == 3 and parts[1] == tok.decode_text(tok.encode_text("the") + [layout.NEWLINE]
                                                           + tok.encode_text("end")), parts
    np.testing.assert_array_equal(parts[0], first)
    np.testing.assert_array_equal(parts[2], second)
    assert [shape for shape, _ in repairs] == [(4, 6)] and any("no <eoss>" in c for c in repairs[0][1])


@pytest.mark.parametrize("corrupt,message", [
    (lambda s: s[:-1], "no <eoss>"),
    (lambda s: s[:4] + s[5:], "row 0 has 5 ids"),
    (lambda s: s[:4] + [9000] + s[5:], "non-code ids \\[9000\\]"),
    # a SEP inside the rows is a stray id (it was read as the training layout's continuous block,
    # so the rows after it were thrown away and filled)
    (lambda s: s[:4] + [SEP] + s[5:], "non-code ids \\[8198\\]"),
    (lambda s: s[:3 + 7] + s[3 + 14:], "3 rows"),
    (lambda s: [BREAK, 9000, 8806] + s[3:], "grid tokens"),
])
def test_malformed_streams_are_typed_errors_or_repaired(tok, corrupt, message):
    codes = np.random.default_rng(2).integers(0, 8192, (4, 6))
    bad = corrupt(_stream(tok, codes))
    with pytest.raises(layout.MalformedImageTokens, match=message):
        layout.parse_image_ids(bad)
    if "grid tokens" in message:
        return
    fixed = layout.parse_image_ids(bad, repair=True)
    assert fixed.code_ids.shape == (4, 6) and fixed.repairs
    assert set(fixed.code_ids.ravel().tolist()) <= set(tok.code_to_bpe.tolist())


def test_encode_item_from_files(tok, tmp_path):
    from PIL import Image
    from skimage import data as skdata

    from unitoken_jax.models.vqgan import VQGANConfig
    from unitoken_jax.vq_tokenizer import VQTokenizer

    Image.fromarray(skdata.coffee()).save(tmp_path / "coffee.png")
    Image.fromarray(skdata.camera()).save(tmp_path / "camera.png")
    vq = VQTokenizer.random(VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=8,
                                        n_embed=8192))
    item = {"conversations": [{"from": "human", "value": "<|image|> then <|image|>"}, {"from": "gpt", "value": "he"}],
            "image": ["coffee.png", "camera.png"]}
    for anyres in (False, True):
        enc, pixels = encode_item(item, tok, vq, image_root=str(tmp_path), anyres=anyres, vq_size=64)
        if not anyres:  # a relative pathlib path is found under image_root too (it was opened from the cwd)
            paths = {**item, "image": [pathlib.Path(p) for p in item["image"]]}
            same, _ = encode_item(paths, tok, vq, image_root=str(tmp_path), vq_size=64)
            assert same.tokens.tolist() == enc.tokens.tolist()
        codes = vq.encode_images([Image.open(tmp_path / "coffee.png"), Image.open(tmp_path / "camera.png")], size=64)
        start, _ = enc.image_spans[0]
        assert enc.tokens[start:start + 3].tolist() == [BREAK, 8812, 8812]  # 16x16 codes = 8 grid units
        assert enc.tokens[start + 3:start + 19].tolist() == tok.codes_to_ids(codes[0][0]).tolist()
        assert enc.feature_index[enc.is_continuous].max() < len(pixels) * 729
        if not anyres:
            assert pixels.shape == (2, 384, 384, 3) and enc.is_continuous.sum() == 2 * 729
        else:
            assert pixels.shape[0] > 2 and (enc.tokens == NL).sum() > 2 * 16
    # a relative path with the default root (the working directory) is named as given ("./nope.png" was
    # said of "nope.png")
    from unitoken_jax.tokenizer.images import ImageError

    with pytest.raises(ImageError, match="^nope.png: no such file"):
        encode_item({**item, "image": ["nope.png", "camera.png"]}, tok, vq, vq_size=64)


def test_the_small_tokenizer_is_the_same_in_every_process():
    """Its byte alphabet comes from a hash set; unsorted, another process numbered text differently."""
    import subprocess
    import sys

    other = subprocess.run([sys.executable, "-c", "from unitoken_jax.tokenizer import small; print(small.build())"],
                           capture_output=True, text=True, check=True, env={**__import__("os").environ,
                                                                             "PYTHONHASHSEED": "123"}).stdout
    assert other.strip() == tokenizer_fixture.build().strip()


def test_a_lone_surrogate_is_a_clear_error(tok):
    """A lone surrogate (a badly decoded argument) reached the tokenizers library as a TypeError."""
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode_text("a red \udc80 circle")
