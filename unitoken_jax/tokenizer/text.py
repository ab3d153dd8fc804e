"""Chameleon's text tokenizer (`text_tokenizer.json`, read with `tokenizers`) and the VQ code <->
BPE id translation that its vocabulary defines.

User and assistant text is always encoded as plain text: `encode_text` uses a copy of the
tokenizer without its added tokens, so a literal "<racm3:break>" or "<reserved08706>" in a prompt
is spelled out in ordinary pieces and never becomes a control id. Control ids come from code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer

from unitoken_jax.tokenizer import layout

_IMAGE_NAME = re.compile(r"^IMGIMG([A-J]+)[A-Z]$")


class TokenizerError(ValueError):
    """A tokenizer file that does not have the ids UniToken was trained with."""


def _image_code(name: str) -> int | None:
    """IMGIMG<digits as letters A-J><one more letter> -> the VQ code (A=0 ... J=9)."""
    m = _IMAGE_NAME.match(name)
    if m is None:
        return None
    return int("".join(str(ord(c) - ord("A")) for c in m.group(1)))


def not_unicode(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone surrogate: a badly decoded file or argument, JSON's
    "\\ud800"), where it is; None when it is. Every door that takes text names its field with it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{e.reason}: {e.object[e.start:e.end]!r} at character {e.start}"
    return None


class TextTokenizer:
    """Chameleon's BPE tokenizer (its text_tokenizer.json) with the VQ-GAN codes' tokens: text to ids
    and back (`encode_text`, `decode_text`), picture codes to ids and back (`codes_to_ids`,
    `ids_to_codes`). `TextTokenizer.from_file(path)` reads one."""

    def __init__(self, tokenizer_json: str):
        """`tokenizer_json`: the contents (not the path) of a tokenizer.json."""
        spec = json.loads(tokenizer_json)
        self._full = Tokenizer.from_str(tokenizer_json)
        # a file saved after a call that truncated or padded keeps those settings: the reference's
        # encode (truncation=False through transformers) applies neither, and text is never cut here
        plain = dict(spec, added_tokens=[], truncation=None, padding=None)
        self._plain = Tokenizer.from_str(json.dumps(plain))
        self._full.no_truncation()
        self._full.no_padding()
        vocab = self._full.get_vocab(with_added_tokens=True)
        self.vocab_size = self._full.get_vocab_size(with_added_tokens=True)

        self.bos_id = vocab.get("<s>")
        if self.bos_id is None:
            raise TokenizerError("the tokenizer has no <s> (BOS) token")
        for name, expected in layout.CONTROL_TOKENS.items():
            got = vocab.get(name)
            if got != expected:
                raise TokenizerError(f"{name} has id {got} in this tokenizer; UniToken's layout needs {expected}")

        codes = {}
        for name, token_id in vocab.items():
            code = _image_code(name)
            if code is not None:
                codes[code] = token_id
        n = len(codes)
        if n == 0 or sorted(codes) != list(range(n)):
            raise TokenizerError(f"the IMGIMG names do not cover codes 0..{n - 1} exactly")
        self.code_to_bpe = np.array([codes[c] for c in range(n)], dtype=np.int32)
        self.bpe_to_code = np.full(self.vocab_size, -1, dtype=np.int32)
        self.bpe_to_code[self.code_to_bpe] = np.arange(n, dtype=np.int32)
        lo, hi = layout.CODE_ID_RANGE
        if self.code_to_bpe.min() < lo or self.code_to_bpe.max() >= hi:
            raise TokenizerError(f"image-code ids span {self.code_to_bpe.min()}..{self.code_to_bpe.max()}, "
                                 f"outside {lo}..{hi - 1}")
        self._control = set(layout.CONTROL_TOKENS.values()) | set(self.code_to_bpe.tolist())
        # LLaVA's picture placeholder as the tokenizer's own added token (Chameleon's HF tokenizer: 8711),
        # or None: what the reference's training data holds where LLaVA-style items write `<image>`
        self.llava_image_id = next((t["id"] for t in spec.get("added_tokens", []) if t.get("content") == "<image>"),
                                   None)

    @classmethod
    def from_file(cls, path: str) -> "TextTokenizer":
        """A tokenizer from a `tokenizers` JSON file (Chameleon's text_tokenizer.json, or the bundled model's)."""
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return cls(f.read())

    def fingerprint(self) -> str:
        """sha256 of the whole tokenizer (its tokenizer.json as the library writes it): what a
        pre-tokenized dataset was made with."""
        return hashlib.sha256(self._full.to_str().encode()).hexdigest()

    @property
    def num_codes(self) -> int:
        return len(self.code_to_bpe)

    def encode_text(self, text: str) -> list[int]:
        """Plain text -> ids; no special token is ever matched in `text`."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a string, got {type(text).__name__}")
        why = not_unicode(text)
        if why:
            raise TokenizerError(f"the text holds a character that is not valid Unicode ({why}): fix the input's "
                                 "encoding")
        ids = self._plain.encode(text, add_special_tokens=False).ids
        bad = [i for i in ids if i in self._control]
        if bad:  # only possible with a tokenizer whose BPE merges build control tokens
            raise TokenizerError(f"plain text {text[:40]!r} encoded to control ids {bad[:5]}")
        return ids

    def token_id(self, name: str) -> int:
        """The id of the token spelled `name` (e.g. "<racm3:break>"); a TokenizerError if there is none."""
        token_id = self._full.token_to_id(name)
        if token_id is None:
            raise TokenizerError(f"no token {name!r} in the tokenizer")
        return token_id

    def decode_text(self, ids: Iterable[int]) -> str:
        """Text ids -> text. The tokenizer's special tokens (`<s>`, `</s>`, `<reserved...>`, which a
        model sampled at temperature 1 can draw: the bundled one's answers held "<reserved08743>") are
        no text and are left out, as transformers' `decode(..., skip_special_tokens=True)` leaves them."""
        return self._full.decode(list(ids), skip_special_tokens=True)

    def codes_to_ids(self, codes) -> np.ndarray:
        """The token ids of VQ-GAN codes (0..num_codes - 1), an array of the codes' shape."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"VQ codes must lie in 0..{self.num_codes - 1}")
        return self.code_to_bpe[codes]

    def ids_to_codes(self, ids) -> np.ndarray:
        """The VQ-GAN codes of image-code token ids, an array of the ids' shape; a ValueError naming
        ids that are not image codes."""
        ids = np.asarray(ids)
        codes = np.where((ids >= 0) & (ids < self.vocab_size), self.bpe_to_code[np.clip(ids, 0, self.vocab_size - 1)], -1)
        if (codes < 0).any():
            raise ValueError(f"ids {ids[codes < 0][:5].tolist()} are not image-code tokens")
        return codes
