"""Conversations in the reference's JSON format -> token ids, labels and image slots, and back.

An item is `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...],
"image": [path, ...]}`. Every message is followed by the end-of-turn token 8710; the sequence
starts with BOS; only assistant turns are predicted (their text, images and end-of-turn).
`<|image|>` in a message marks where the next image goes (an item with images and no placeholder
gets them all at the start of the first message, as the reference does). Each image becomes

    <racm3:break> H W rows... SEP {continuous x N} <eoss>

with its codes labelled when the image is in an assistant turn. SEP is labelled for every image
and the continuous positions never are, both as in the reference's training forward.

Message text is always plain text (see `TextTokenizer.encode_text`); only a declared
placeholder becomes an image.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from unitoken_jax.tokenizer import anyres as anyres_lib
from unitoken_jax.tokenizer import layout
from unitoken_jax.tokenizer.anyres import NEWLINE_ENTRY
from unitoken_jax.tokenizer.images import load_image, siglip_pixels
from unitoken_jax.tokenizer.text import TextTokenizer

IMAGE_PLACEHOLDER = "<|image|>"
IGNORE = -100
_HUMAN = ("human", "user")
_ASSISTANT = ("gpt", "assistant")
ASSISTANT_ROLES = _ASSISTANT  # the "from" of an answer


class ConversationError(ValueError):
    """An item that cannot be turned into a training or inference sequence."""


class SequenceTooLong(ConversationError):
    """The sequence would not fit the maximum length; it is never cut (above all not inside an image).
    Where the whole conversation is over it (no one picture alone is): the `positions` it takes and
    the `max_length`, for callers that name their own field in their words; None otherwise."""

    def __init__(self, message: str, positions: int | None = None, max_length: int | None = None):
        super().__init__(message)
        self.positions, self.max_length = positions, max_length


@dataclasses.dataclass
class ImageInput:
    """What the sequence needs of one image: its VQ code grid and its continuous block."""

    codes: np.ndarray  # [h, w] VQ code indices
    entries: np.ndarray  # continuous block: feature index (image-local) or NEWLINE_ENTRY
    num_features: int  # features this image contributes to the flat feature list


@dataclasses.dataclass
class EncodedConversation:
    tokens: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L], IGNORE where not predicted (aligned with tokens)
    is_continuous: np.ndarray  # bool [L]
    feature_index: np.ndarray  # int32 [L]: row of this item's flat image-feature list
    image_spans: list[tuple[int, int]]  # [start, end) of each image, in order
    image_predicted: list[bool]  # whether each image is in an assistant turn

    def __len__(self):
        return len(self.tokens)


def _messages(item: dict[str, Any]) -> list[tuple[bool, str | None]]:
    conv = item.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ConversationError("the item has no 'conversations' list")
    out = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise ConversationError(f"message {i} is a {type(msg).__name__}, not an object with 'from' and 'value'")
        who = msg.get("from")
        expected = _HUMAN if i % 2 == 0 else _ASSISTANT
        if who is None and "role" in msg:
            raise ConversationError(f"message {i} has 'role' and 'content' (OpenAI's format); messages here are "
                                    "{'from': 'human' or 'gpt', 'value': text}, with '<|image|>' where each picture "
                                    "goes ('unitoken serve' takes OpenAI's format)")
        who = who.lower() if isinstance(who, str) else who  # ("Human", "GPT": the reference lower-cases them too)
        if who not in expected:
            raise ConversationError(f"message {i} is from {msg.get('from')!r}, where a turn from "
                                    f"{' or '.join(map(repr, expected))} goes; turns alternate human, gpt, human, ...")
        if "value" not in msg:
            raise ConversationError(f"message {i} has no 'value' (its keys: {', '.join(map(str, msg))}); messages "
                                    "are {'from': 'human' or 'gpt', 'value': text}")
        value = msg.get("value")
        if value is None and not (i == len(conv) - 1 and who in _ASSISTANT):
            raise ConversationError(f"message {i} has no value (only a last assistant turn may be empty: "
                                    "the prompt for generation)")
        if value is not None and not isinstance(value, str):
            raise ConversationError(f"message {i} has a {type(value).__name__} value, not text")
        out.append((who in _ASSISTANT, value))
    return out


def image_list(item: dict[str, Any]) -> list:
    if "image" not in item and "images" in item:  # (read as none, its questions were trained as text)
        raise ConversationError("the item's pictures are under 'images'; they go under 'image' (a file name or a "
                                "list of them)")
    images = item.get("image", [])
    if images is None:
        return []
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    # numbers and structures are never pictures (the message below says what is)
    if any(p is None or isinstance(p, (bool, int, float, dict, list, tuple)) for p in images):
        raise ConversationError("'image' must be a file name or a list of them (from Python also pictures: PIL "
                                f"images, uint8 arrays, bytes, file objects), got {item.get('image')!r}")
    return images


def encode_conversation(item: dict[str, Any], images: Sequence[ImageInput], tokenizer: TextTokenizer,
                        max_length: int | None = None, *, llava_image: bool = False) -> EncodedConversation:
    """An item's ids, labels and continuous positions. `llava_image` (training data): a literal
    `<image>`, LLaVA's placeholder, is the tokenizer's own `<image>` token where it has one, as the
    reference's data carry it (the pictures themselves go where `<|image|>` says, or in front);
    elsewhere all text is plain."""
    messages = _messages(item)
    llava_id = tokenizer.llava_image_id if llava_image else None

    def encode_text(piece: str) -> list[int]:
        if llava_id is None:
            return tokenizer.encode_text(piece)
        ids: list[int] = []
        for j, word in enumerate(piece.split("<image>")):  # tokenized apart, as at a tokenizer's added token
            ids.extend(([llava_id] if j else []) + (tokenizer.encode_text(word) if word else []))
        return ids

    n_placeholders = sum(v.count(IMAGE_PLACEHOLDER) for _, v in messages if v is not None)
    if n_placeholders == 0 and images:
        predicted, first = messages[0]
        messages[0] = (predicted, f"{IMAGE_PLACEHOLDER} " * len(images) + first)
    elif n_placeholders != len(images):
        llava = sum(v.count("<image>") for _, v in messages if v is not None)
        raise ConversationError(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images"
                                + (f" (the {llava} '<image>' in the text, LLaVA's mark, are read as words: write "
                                   f"{IMAGE_PLACEHOLDER} where a picture goes)" if llava else ""))

    tokens, labels, cont, index = [tokenizer.bos_id], [IGNORE], [False], [0]
    spans, predicted_flags = [], []
    offset = 0

    def add(ids, labelled: bool, continuous=False, feature=None):
        tokens.extend(ids)
        labels.extend(ids if labelled else [IGNORE] * len(ids))
        cont.extend([continuous] * len(ids))
        index.extend([0] * len(ids) if feature is None else feature)

    image_iter = iter(images)
    for predicted, value in messages:
        if value is None:
            continue
        pieces = value.split(IMAGE_PLACEHOLDER)
        for j, piece in enumerate(pieces):
            if piece:
                add(encode_text(piece), predicted)
            if j == len(pieces) - 1:
                break
            image = next(image_iter)
            start = len(tokens)
            add(layout.discrete_image_ids(tokenizer.codes_to_ids(image.codes)), predicted)
            tokens.append(layout.SEP)
            labels.append(layout.SEP)
            cont.append(False)
            index.append(0)
            for e in np.asarray(image.entries):
                if e == NEWLINE_ENTRY:
                    add([layout.NEWLINE], False)
                else:
                    if not 0 <= e < image.num_features:
                        raise ConversationError(f"continuous entry {e} outside the image's {image.num_features} features")
                    add([0], False, continuous=True, feature=[offset + int(e)])
            add([layout.IMAGE_END], predicted)
            offset += image.num_features
            spans.append((start, len(tokens)))
            predicted_flags.append(predicted)
            if max_length is not None and len(tokens) - start > max_length:
                raise SequenceTooLong(f"image {len(spans)} alone takes {len(tokens) - start} positions, more than "
                                      f"the maximum length {max_length}")
        add([layout.END_OF_TURN], predicted)

    if max_length is not None and len(tokens) > max_length:
        raise SequenceTooLong(f"the conversation takes {len(tokens)} positions, more than the maximum length "
                              f"{max_length}", len(tokens), max_length)
    # (SEP is labelled in every turn, as the reference does: a user's picture alone predicts nothing)
    if not any(l not in (IGNORE, layout.SEP) for l in labels) and messages[-1][1] is not None:
        raise ConversationError("nothing in the item is predicted (no assistant turn)")
    return EncodedConversation(np.array(tokens, np.int32), np.array(labels, np.int32), np.array(cont, bool),
                               np.array(index, np.int32), spans, predicted_flags)


def _picture_end(ids: list[int], i: int) -> int:
    """Where the picture starting at `ids[i]` (its <racm3:break>) ends: after its <eoss>; without
    one, after the ids its size tokens declare, and never past the next picture's <racm3:break>
    (the text after a picture that lost its <eoss> stays text)."""
    stop = ids.index(layout.IMAGE_START, i + 1) if layout.IMAGE_START in ids[i + 1:] else len(ids)
    if layout.IMAGE_END in ids[i:stop]:
        return ids.index(layout.IMAGE_END, i) + 1
    grid = [g - layout.GRID_BASE for g in ids[i + 1:i + 3]]
    if len(grid) == 2 and all(1 <= g <= layout.MAX_GRID for g in grid):
        return min(stop, i + layout.generated_image_length(tuple(grid)) - 1)  # (no <eoss>)
    return stop


def ended(ids: Sequence[int], stop_tokens: Sequence[int] = (layout.END_OF_TURN,), *,
          stop_after_image: bool = False) -> bool:
    """Whether generated `ids` end as an answer ends (a stop token, or a picture's end where the
    request stops after one), not cut by a budget: `decode`'s `unfinished` is its negation."""
    last = int(ids[-1]) if len(ids) else None
    return last in stop_tokens or (stop_after_image and last == layout.IMAGE_END)


def decode(ids: Sequence[int], tokenizer: TextTokenizer, vq=None, *, repair: bool = False,
           repairs: list | None = None, unfinished: bool = False) -> list:
    """Generated ids -> [text, picture, text, ...]. Pictures are PIL images when `vq` can decode,
    else code grids [h, w]. BOS and end-of-turn tokens are dropped from the text. With `repair`, a
    malformed or unfinished picture is completed (`layout.parse_image_ids`), and `repairs` (a list)
    gets `((h, w) code grid, [what was changed])` for each picture that needed it; one cut off
    before its size tokens is dropped (`(None, [...])` in `repairs`). `unfinished`: the answer was
    cut before its end; the bytes of a last character that never came (U+FFFD) are left out, as a
    stream leaves them out (`TextStream`)."""
    ids = [int(i) for i in ids]
    parts: list = []
    text: list[int] = []

    def flush():
        kept = [i for i in text if i not in (tokenizer.bos_id, layout.END_OF_TURN)]
        if kept:
            parts.append(tokenizer.decode_text(kept))
        text.clear()

    i = 0
    while i < len(ids):
        if ids[i] != layout.IMAGE_START:
            text.append(ids[i])
            i += 1
            continue
        flush()
        end = _picture_end(ids, i)
        try:
            # (a picture cut before its first code is filled with code 0, which every VQ-GAN has)
            parsed = layout.parse_image_ids(ids[i:end], repair=repair,
                                            filler_id=int(tokenizer.codes_to_ids([0])[0]) if repair else None)
        except layout.MalformedImageTokens:
            if not repair:
                raise
            # (repairing, only a size that is not there raises) an answer cut off before its picture's
            # size tokens: there is no picture to complete
            if repairs is not None:
                repairs.append((None, [f"cut off after {end - i} of its ids, before its size: dropped"]))
            i = end
            continue
        if parsed.repairs and repairs is not None:
            repairs.append((parsed.code_ids.shape, parsed.repairs))
        codes = tokenizer.ids_to_codes(parsed.code_ids)
        parts.append(vq.decode_to_pil(codes[None])[0] if vq is not None and vq.has_decoder else codes)
        i = end
    flush()
    if unfinished and parts and isinstance(parts[-1], str):
        parts[-1] = parts[-1].rstrip("\ufffd")
        if not parts[-1]:
            parts.pop()
    return parts


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where `text` is cut for its stop strings: at the start of the one that is complete first as
    the text grows (the earliest end; of those ending there, the longest), or None. Generation
    stops as soon as a stop string is there, so a later one that starts earlier never counts, and
    a stream (which sees the text grow) cuts where the finished answer is cut."""
    best = None
    for s in stop:
        at = text.find(s)
        if at >= 0 and (best is None or (at + len(s), at) < (best[0] + len(best[1]), best[0])):
            best = (at, s)
    return None if best is None else best[0]


def stop_seen(ids: Sequence[int], tokenizer: TextTokenizer, stop: Sequence[str], *,
              starts_in_picture: bool = False) -> bool:
    """Whether an answer's ids so far hold one of the `stop` strings in their text (outside its
    pictures, which are read without being drawn)."""
    full = [layout.IMAGE_START, *ids] if starts_in_picture else list(ids)
    return any(isinstance(p, str) and first_stop(p, stop) is not None
               for p in decode(full, tokenizer, None, repair=True))


def tokens_to_stop(ids: Sequence[int], tokenizer: TextTokenizer, stop: Sequence[str], *,
                   starts_in_picture: bool = False) -> int:
    """How many of `ids` were generated until a stop string was complete (all of them if none
    is): what an answer that stops there has cost. Whether the text holds one only grows with the
    ids, so the first such prefix is found by bisection."""
    seen = lambda n: stop_seen(ids[:n], tokenizer, stop, starts_in_picture=starts_in_picture)  # noqa: E731
    if not stop or not seen(len(ids)):
        return len(ids)
    lo, hi = 0, len(ids)  # seen(hi), not seen(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if seen(mid) else (mid, hi)
    return hi


class TextStream:
    """The text an answer has so far, as it may be streamed: the text before the answer's first
    picture, decoded from the ids generated so far (an end of turn the request did not stop at,
    `stop_tokens=()`, is left out as `decode` leaves it out: the text after it was not streamed).

    `update(ids)` returns the text not yet sent that is settled: it holds back a last character
    that is only part of a multi-byte character (U+FFFD while its bytes are incomplete) and, while
    `stop` strings are asked for, the last `max(len(stop)) - 1` characters (a stop string may be
    starting there); it cuts at the first stop string (`first_stop`) and then sends nothing
    more. `rest(parts)` is what is left of the finished answer's parts (after `apply_stop`) once
    the sent text is taken off its first part. The decoded text of a prefix of ids is a prefix of the text of all
    of them for the byte-level BPE the models use; where it is not, `rest` says so."""

    def __init__(self, tokenizer, stop: list[str], *, starts_in_picture: bool = False):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""
        self.closed = starts_in_picture  # an answer that begins inside a picture has no text before it

    def update(self, ids) -> str:
        if self.closed:
            return ""
        text_ids, complete = [], False
        for i in (int(i) for i in ids):
            if i == layout.IMAGE_START:
                complete = True
                break
            if i not in (self.tokenizer.bos_id, layout.END_OF_TURN):
                text_ids.append(i)
        text = self.tokenizer.decode_text(text_ids) if text_ids else ""
        cut = first_stop(text, self.stop)
        if cut is not None:
            text, complete = text[:cut], True
        elif not complete:
            text = text.rstrip("\ufffd")  # bytes of a character still to come: not one yet
            text = text[:max(0, len(text) - self.hold)]
        self.closed = complete
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self, parts: list) -> list:
        if not self.sent:
            return parts
        first = parts[0] if parts else ""
        if not isinstance(first, str) or not first.startswith(self.sent):
            raise ValueError(f"the streamed text {self.sent!r} is not how the answer begins ({first!r})")
        return ([first[len(self.sent):]] if len(first) > len(self.sent) else []) + parts[1:]


def pictures(parts: list) -> list[Image.Image]:
    """The pictures of `decode`'s parts (its text left out)."""
    return [p for p in parts if isinstance(p, Image.Image)]


def encode_item(item: dict[str, Any], tokenizer: TextTokenizer, vq, *, image_root: str = ".", anyres: bool = False,
                vq_size: int = 512, siglip_size: int = 384, patch: int = 14, max_length: int | None = None,
                continuous: bool = True, anyres_pinpoints=None):
    """One JSON item with its image files -> (EncodedConversation, SigLIP pixels [tiles, S, S, 3]).

    Convenience for single items (inference, tests); the pre-tokenizer batches many items' images
    through the VQ-GAN at once instead. `feature_index` refers to the rows of
    `features(pixels).reshape(-1, D)`.
    """
    paths = image_list(item)
    # paths (named in errors as given: "./a.png" was said of "a.png"), or PIL images / bytes / file objects as they are
    joined = image_root not in (".", "")
    pictures_ = [load_image(os.path.join(image_root, p) if joined and isinstance(p, (str, os.PathLike))
                            and not os.path.isabs(p) else p) for p in paths]
    side = siglip_size // patch
    codes = vq.encode_images(pictures_, size=vq_size) if pictures_ else []
    inputs, pixels = [], []
    for picture, code in zip(pictures_, codes):
        if not continuous:  # discrete codes only (the ablation's models)
            inputs.append(ImageInput(code, np.zeros(0, np.int64), 0))
        elif anyres:
            tiled = anyres_lib.anyres_image(picture, siglip_size, patch, anyres_pinpoints)
            inputs.append(ImageInput(code, tiled.entries, len(tiled.pixels) * side * side))
            pixels.append(tiled.pixels)
        else:
            inputs.append(ImageInput(code, anyres_lib.base_entries(side), side * side))
            pixels.append(siglip_pixels(picture, siglip_size)[None])
    encoded = encode_conversation(item, inputs, tokenizer, max_length=max_length)
    stacked = np.concatenate(pixels) if pixels else np.zeros((0, siglip_size, siglip_size, 3), np.float32)
    return encoded, stacked
