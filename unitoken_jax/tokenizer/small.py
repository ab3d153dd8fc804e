"""A small tokenizer.json with Chameleon's special-token ids and IMGIMG names (codes permuted,
so the code <-> id map is not an offset) and a byte-level BPE for text from id 8900 on.

For tiny models, demos and tests, where the real `text_tokenizer.json` is not at hand. With the
default merges its vocabulary has `VOCAB_SIZE` ids, so a model for it needs at least that many
embeddings; `learn_merges` learns merges for a corpus (whole words for a small world's texts),
and `vocab_size(merges)` says how many ids `build(merges=...)` then has.
"""

import json

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from unitoken_jax.tokenizer import layout

N_CODES = 8192
TEXT_BASE = 8900
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "s"), ("Ġ", "a"), ("o", "r"), ("e", "n")]


def code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def learn_merges(texts: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges learned from `texts` by `tokenizers`' trainer (at most `max_merges`;
    it stops earlier once every word of the corpus is one token)."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + max_merges, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(texts), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def vocab_size(merges=None) -> int:
    return TEXT_BASE + 256 + len(MERGES if merges is None else merges)


def build(seed: int = 0, merges=None) -> str:
    """The tokenizer.json text (codes permuted by `seed`; `merges`: BPE merges, default `MERGES`)."""
    merges = [tuple(m) for m in (MERGES if merges is None else merges)]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    ids = np.random.default_rng(seed).permutation(N_CODES) + 4
    for code, token_id in enumerate(ids):
        vocab[code_name(code)] = int(token_id)
    vocab.update({"<eoss>": layout.IMAGE_END, "<racm3:break>": layout.IMAGE_START, "<sentinel:0>": layout.SEP})
    for token_id in range(layout.SEP + 1, TEXT_BASE):
        vocab[f"<reserved{token_id - 4:05d}>"] = token_id
    next_id = TEXT_BASE
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: the alphabet comes in hash order
        vocab[ch] = next_id
        next_id += 1
    for a, b in merges:
        if a + b in vocab:
            raise ValueError(f"merge {a!r} + {b!r} makes a token that is already in the vocabulary")
        vocab[a + b] = next_id
        next_id += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<sentinel:0>"]
    specials += [f"<reserved{i - 4:05d}>" for i in range(8199, TEXT_BASE)]
    tok.add_special_tokens(specials)
    spec = json.loads(tok.to_str())
    assert all(vocab[t["content"]] == t["id"] for t in spec["added_tokens"])
    return tok.to_str()


VOCAB_SIZE = vocab_size()
