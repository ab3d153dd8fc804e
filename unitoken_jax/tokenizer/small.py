"""A small tokenizer.json with Chameleon's special-token ids and IMGIMG names (codes permuted,
so the code <-> id map is not an offset) and a byte-level BPE for text from id 8900 on.

For tiny models, demos and tests, where the real `text_tokenizer.json` is not at hand. Its
vocabulary has `VOCAB_SIZE` ids, so a model for it needs at least that many embeddings.
"""

import json

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

N_CODES = 8192
TEXT_BASE = 8900
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "s"), ("Ġ", "a"), ("o", "r"), ("e", "n")]


def code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def build(seed: int = 0) -> str:
    """The tokenizer.json text (codes permuted by `seed`)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    ids = np.random.default_rng(seed).permutation(N_CODES) + 4
    for code, token_id in enumerate(ids):
        vocab[code_name(code)] = int(token_id)
    vocab.update({"<eoss>": 8196, "<racm3:break>": 8197, "<sentinel:0>": 8198})
    for token_id in range(8199, TEXT_BASE):
        vocab[f"<reserved{token_id - 4:05d}>"] = token_id
    next_id = TEXT_BASE
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: the alphabet comes in hash order
        vocab[ch] = next_id
        next_id += 1
    for a, b in MERGES:
        vocab[a + b] = next_id
        next_id += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<sentinel:0>"]
    specials += [f"<reserved{i - 4:05d}>" for i in range(8199, TEXT_BASE)]
    tok.add_special_tokens(specials)
    spec = json.loads(tok.to_str())
    assert all(vocab[t["content"]] == t["id"] for t in spec["added_tokens"])
    return tok.to_str()


VOCAB_SIZE = TEXT_BASE + 256 + len(MERGES)
