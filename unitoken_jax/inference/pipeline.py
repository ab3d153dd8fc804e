"""understand / generate_image / edit / chat on top of the decode loop, with PIL in and out.

    pipe = UniTokenPipeline(model, tokenizer, vq)
    pipe.understand(["cat.jpg"], "What animal is this?")              # -> "A cat."
    pipe.generate_image("a red fox in snow", size=(512, 512), cfg=3.0, n=4, seed=0)   # -> [PIL x 4]
    pipe.edit("cat.jpg", "make it a watercolour")                      # -> PIL
    pipe.chat([{"from": "human", "value": "<|image|> and this?"}], images=["dog.png"])

`understand`, `generate_image` and `edit` take lists as well as single values and run them as one
batch (`chat` is one conversation); `run` takes any mix of requests (`*_request` methods) and
returns each one's decoded parts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import string
import sys
import warnings
from collections.abc import Iterable
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from unitoken_jax.convert import files
from unitoken_jax.inference.decode import DecodeLoop, OptionError, Request, whole_number
from unitoken_jax.tokenizer import anyres as anyres_lib
from unitoken_jax.tokenizer import layout
from unitoken_jax.tokenizer.conversation import (IMAGE_PLACEHOLDER, ConversationError, SequenceTooLong, TextStream,
                                                decode, encode_item, ended)
from unitoken_jax.tokenizer.text import not_unicode

# How the reference asks UniToken's released models for a picture (its README's example and its
# demos/inference.py). Lumina-mGPT's form, which the reference's inherited scripts use, names the size
# (`world.shapes.GENERATE_TEMPLATE`, what the shapes world was trained with); `{w}` and `{h}` are
# filled in where a template names them.
GENERATE_TEMPLATE = "Generate an image according to the following prompt:\n{prompt}"
# The reference appends id 16853 before <racm3:break> when it asks the released model for an image.
REFERENCE_IMAGE_PREFIX = layout.REFERENCE_IMAGE_PREFIX
# a chat answer's default budget: the reference's free-form demo's, room for a 512 x 512 picture
# (1,060 tokens) and its text; a row also stops at the model's last position
CHAT_MAX_NEW_TOKENS = 2048


def check_template(template: str) -> str:
    """A drawing prompt's template: text with `{prompt}` (and optionally `{w}`, `{h}`), as
    `str.format` fills it. Anything else is refused here, not met as a KeyError mid-batch or a
    prompt silently left out."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        template.format(w=1, h=1, prompt="")
    except (AttributeError, KeyError, IndexError, ValueError, TypeError) as e:
        raise ValueError(f"a drawing template may name only {{prompt}}, {{w}} and {{h}} (write a brace as {{{{ or "
                         f"}}}}); {template!r}: {type(e).__name__} {e}") from None
    if "prompt" not in fields:  # ('{{prompt}}' is a literal '{prompt}': the prompt would be left out)
        raise ValueError(f"a drawing template needs {{prompt}} (and may name {{w}} and {{h}}), got {template!r}")
    return template


class AnswerCut(UserWarning):
    """An answer stopped at its `max_new_tokens` or the model's last position before it ended
    (its end of turn, or a picture's <eoss> where the request stops after one). `answers`: (the
    answer's number, where it stopped) for each."""

    def __init__(self, message: str, answers: Sequence[tuple[int, str]] = ()):
        super().__init__(message)
        self.answers = list(answers)


class PictureRepaired(AnswerCut):
    """An answer's picture did not finish (its budget or the model's positions ran out) or was
    malformed, and was completed by `layout.parse_image_ids`'s repair rules."""


class UntrainedSize(UserWarning):
    """A picture size the model was not trained to draw (the bundled model: 64 x 64 only)."""


class PictureTooLarge(SequenceTooLong):
    """A picture size too large for the model beside its prompt, where a smaller size fits:
    the size's fault (the server names `size`), not the prompt's. `fits`: the largest that does."""

    def __init__(self, message: str, fits: tuple[int, int] | None = None):
        super().__init__(message)
        self.fits = fits


class NegativePromptError(ValueError):
    """A negative prompt the request cannot take: with cfg=1 (no guidance), text that is not plain
    (a picture's mark, a character that is not valid Unicode), or too long (`NegativePromptTooLong`)."""


class NegativePromptTooLong(NegativePromptError):
    """A negative prompt too long by itself, or too long to leave its row the picture's positions."""


def picture_grid(pictures, columns: int | None = None, side: int | None = None, gap: int = 4) -> Image.Image:
    """Pictures side by side (`columns` a row; all of them by default), each scaled to `side`
    pixels (the largest one's size by default; NEAREST, so small pictures stay crisp): one image
    to show in a notebook or save. A picture may also be a uint8 array ([H, W] or [H, W, 3 or 4])."""
    pictures = [p for row in pictures for p in (row if isinstance(row, (list, tuple)) else [row])]
    if not pictures:
        raise ValueError("no pictures to put in a grid")
    pictures = [Image.fromarray(np.asarray(p)) if isinstance(p, np.ndarray) else p for p in pictures]
    if columns is not None and (isinstance(columns, bool) or _whole(columns) != columns or columns < 1):
        raise ValueError(f"columns must be a whole number, at least 1 (None: all in one row); got {columns!r}")
    side = side or max(max(p.size) for p in pictures)
    columns = int(columns or len(pictures))
    rows = -(-len(pictures) // columns)
    grid = Image.new("RGB", (columns * (side + gap) - gap, rows * (side + gap) - gap), (255, 255, 255))
    for i, p in enumerate(pictures):
        grid.paste(p.convert("RGB").resize((side, side), Image.NEAREST), ((i % columns) * (side + gap),
                                                                           (i // columns) * (side + gap)))
    return grid


def _listify(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _say(warning: Warning) -> None:
    """Warns at the first frame outside this package (the caller's own line, however deep the
    library's calls went), every time: a fixed stack level blamed a line inside the library for
    `understand`, and Python's default filter shows a warning once a place, so from the second
    call on cut answers were silent. The caller's own filters ("ignore", "error", "once") apply."""
    frame = sys._getframe(1)
    # (normalised: a script that put `its_folder/..` on sys.path imports the package by such a path)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
    if frame is None:  # (called from the package alone)
        warnings.warn(warning, stacklevel=2)
        return
    # no registry (`warn` keeps one a module, which the default action fills; "once" keeps its own). No
    # module_globals for code with no file ("<stdin>", "<string>": the REPL, python -c): the line's
    # source was asked of __main__'s loader, BuiltinImporter, whose ImportError replaced the warning
    filename = frame.f_code.co_filename
    warnings.warn_explicit(warning, type(warning), filename, frame.f_lineno, module=frame.f_globals.get("__name__"),
                           registry=None, module_globals=None if filename.startswith("<") else frame.f_globals)


def _whole(value):
    """A whole number (a NumPy integer, 2.0) as Python's int; anything else as it is, for the
    caller's check to refuse."""
    whole = whole_number(value)
    return value if whole is None else whole


def _pictures_a_call(n) -> int:
    """A call's `n` (pictures of each prompt or edit) as an int, refused unless a whole number >= 1."""
    n = _whole(n)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a whole number of pictures, at least 1; got {n!r}")
    return n


# the options a request takes from a caller (the rest of `Request` is made from the call's own arguments)
_REQUEST_OPTIONS = tuple(f.name for f in dataclasses.fields(Request)
                         if f.name not in ("tokens", "is_continuous", "feature_index", "pixels", "uncond_tokens"))


# a request's fields that act only where it draws a picture (understand's answers draw none)
_PICTURE_OPTIONS = ("image_temperature", "image_top_k", "image_top_p", "cfg_scale", "grid_hw", "max_grid",
                    "allow_images", "stop_after_image")
# a picture request's fields it sets itself: what it is (one picture, then the end)
_DRAWING_FIELDS = ("allow_images", "stop_after_image", "max_grid")


def _check_options(options: dict, own: dict[str, str] | None = None, not_here: Sequence[str] = (),
                   why: str = "") -> None:
    """An unknown keyword is a TypeError naming the options there are (it was one naming
    `Request.__init__`, a class the caller never called); `own`: the request's fields this call
    sets from arguments of its own (field -> the argument's name); `not_here`: fields this call
    does not take (`why`: what it does instead), refused rather than ignored or misapplied."""
    own = own or {}
    for k in options:
        if k in own:
            raise TypeError(f"{k} is set by {own[k]}= here")
        if k in not_here:
            raise TypeError(f"{k} is not an option here: {why}")
        if k not in _REQUEST_OPTIONS:
            options_ = [own.get(o, o) for o in _REQUEST_OPTIONS if o not in not_here]
            raise TypeError(f"unexpected keyword argument {k!r}; the options a request takes: {', '.join(options_)}")


def _too_large(w: int, h: int, max_grid: int) -> ValueError:
    """A picture size past what a request may draw, said in pixels (it was said as grid_hw, a field
    the caller never gave)."""
    unit = layout.PIXELS_PER_GRID
    return ValueError(f"size {w}x{h} is too large: each side may be at most {max_grid * unit} pixels (max_grid="
                      f"{max_grid} grid units of {unit} px)")


def _seed_of(seed, j: int):
    """The seed of a call's picture j: `seed` + j, wrapping past 2**32 - 1 (a seed out of range is
    passed on as it is, for its request to refuse by name)."""
    valid = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < 2 ** 32
    return (int(seed) + j) % 2 ** 32 if valid else seed


def _pictures(images) -> list:
    """A list of pictures from one picture (a path, bytes, a PIL image, an array) or a list of them:
    one passed alone was taken apart (a path into characters, an array into rows)."""
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    return list(images)


def _paired(text, what: str, inputs, listed: Callable, inputs_are: str, rule: str) -> tuple[bool, list, list]:
    """(single, texts, inputs): one text with its input, or a list of texts with `listed(inputs)`,
    as many."""
    if isinstance(text, str):
        return True, [text], [inputs]
    texts = _texts(text, what)
    if isinstance(inputs, (str, bytes, os.PathLike, Image.Image)):  # (a path was taken apart into characters)
        raise ValueError(f"{len(texts)} {what}s and one picture ({type(inputs).__name__}): give {rule}")
    given = listed(inputs)
    if len(given) != len(texts):
        raise ValueError(f"{len(texts)} {what}s and {len(given)} {inputs_are}: give {rule}")
    return False, texts, given


def _texts(values, what: str) -> list[str]:
    """A list of strings, or a clear error naming `what` (a prompt of None or a number is no text)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a string or a list of strings, got {values!r:.80}")
    values = list(values)
    wrong = [v for v in values if not isinstance(v, str)]
    if wrong:
        raise TypeError(f"each {what} must be a string, got {wrong[0]!r:.80}")
    return values


def _naming(make: Callable, which: str | None):
    """`make()`; a conversation it cannot make (too long, a picture's mark in the text) says
    `which` of a list it was (a batch's error had named none of its items)."""
    try:
        return make()
    except ConversationError as e:
        if which is None:
            raise
        named = type(e)(f"{which}: {e}")
        named.__dict__.update(e.__dict__)  # what it carries besides its words (`PictureTooLarge.fits`)
        raise named from None


def _plain(text: str, what: str) -> str:
    """`text`, refused (a `ConversationError` naming `what`) when it holds the mark of a picture's
    place (it would be read as one) or a character that is not valid Unicode (a lone surrogate:
    the tokenizer's error named only "the text", with the template's words around it)."""
    if IMAGE_PLACEHOLDER in text:
        raise ConversationError(f"the {what} contains {IMAGE_PLACEHOLDER!r}, the mark of where a picture goes: "
                                f"pass pictures as images, and write the text without the mark ({text!r:.80})")
    why = not_unicode(text)
    if why:
        raise ConversationError(f"the {what} holds a character that is not valid Unicode ({why})")
    return text


# what the text options mean in a picture request: the code sampling's (a picture draws no text)
_IMAGE_SAMPLING = {"temperature": "image_temperature", "top_k": "image_top_k", "top_p": "image_top_p"}


def _size_pair(size) -> tuple[int, int]:
    """(width, height) in pixels, as a pair; "512x512" and other shapes are refused by name."""
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
        raise ValueError(f"size must be (width, height) in pixels, e.g. (512, 512); got {size!r}")
    # (NumPy integers and whole floats as Python's ints: the loop's arithmetic takes those)
    return tuple(_whole(v) for v in size)


# beside a trained model (training's final/): how its data laid out pictures, so that inference cuts them
# as training did (the default rule below picked 256 px for a small model trained on 64 px crops, and it
# answered about its own training pictures wrongly, unsaid)
TRAINED_PICTURES = files.TRAINED_PICTURES


def trained_record(model) -> dict:
    """What `model`'s directory (or the directory `model` names) records of its training data
    (`TRAINED_PICTURES`: the data's VQ crop, tile, AnyRes and continuous settings, the text
    tokenizer's and VQ-GAN's fingerprints); {} if none."""
    source = model if isinstance(model, str) else getattr(model, "source", None)
    path = os.path.join(source, TRAINED_PICTURES) if isinstance(source, str) else None
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def trained_vq_size(record: dict) -> int | None:
    """The VQ crop a model's training data was cut at, if its `trained_record` says."""
    size = record.get("vq_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


class OtherTokenizer(UserWarning):
    """The text tokenizer given is not the one the model's training data was made with (its
    fingerprint differs from the one `TRAINED_PICTURES` records): the model's ids mean other words."""


def check_trained_tokenizer(model, record: dict, tokenizer) -> None:
    """Warns `OtherTokenizer` where `model`'s `trained_record` names its data's tokenizer and
    `tokenizer` is another."""
    trained = record.get("tokenizer_sha256")
    if isinstance(trained, str) and hasattr(tokenizer, "fingerprint") and tokenizer.fingerprint() != trained:
        warnings.warn(OtherTokenizer(
            f"{model.source} was trained on data pre-tokenized with another text tokenizer (sha256 {trained[:12]}..., "
            f"this one's {tokenizer.fingerprint()[:12]}...): its answers and pictures would read ids as other "
            "words. Give the tokenizer its data was pre-tokenized with"), stacklevel=3)


class OtherVQGAN(UserWarning):
    """The VQ-GAN given is not the one the model's training data was coded with (its fingerprint
    differs from the one `TRAINED_PICTURES` records): the model's codes draw other pictures."""


def check_trained_vqgan(model, record: dict, vq) -> None:
    """Warns `OtherVQGAN` where `model`'s `trained_record` names its data's VQ-GAN and `vq` is
    another (a model trained on a 256-code VQ-GAN, given a 16-code one, drew noise unsaid)."""
    trained = record.get("vqgan_sha256")
    if vq is None or not isinstance(trained, str) or not hasattr(vq, "fingerprint"):
        return
    found = vq.fingerprint()
    if found != trained:
        warnings.warn(OtherVQGAN(
            f"{model.source} was trained on pictures coded with another VQ-GAN (sha256 {trained[:12]}..., this one's "
            f"{found[:12]}...): the codes it draws and reads would be other pictures' codes. Give the VQ-GAN its "
            "data was pre-tokenized with"), stacklevel=3)


def trained_size(record: dict, vq) -> tuple[int, int] | None:
    """The `size` (in the prompt's units: 32 px a grid unit of 2 codes, the release VQ-GAN's 16 px a
    code) that asks for the code grid of the model's training pictures, where its record gives
    their crop: e.g. 512 x 512 for the release's 512 px crop, 128 x 128 for the demo VQ-GAN's 32 px at
    4 px a code (8 x 8 codes, drawn as 32 x 32 pixels)."""
    crop = trained_vq_size(record)
    factor = vq_factor(vq)
    if crop is None or crop % (factor * layout.CODES_PER_GRID):
        return None
    side = crop // (factor * layout.CODES_PER_GRID) * layout.PIXELS_PER_GRID
    return side, side


def vq_factor(vq) -> int:
    """Pixels a code of `vq` takes each way (16 for the release's VQ-GAN; 16 without one)."""
    return vq.config.downsample_factor if vq is not None else 16


def default_vq_size(max_length: int, vq) -> int:
    """512 px (the release's crop), halved while its code grid would take more than a quarter of
    a model `max_length` long (a small model's picture must leave room for the conversation)."""
    factor = vq_factor(vq)
    size = 512
    while size > factor and (size // factor) ** 2 > max_length // 4:
        size //= 2
    return size


def with_positions(model, positions: int):
    """A shallow copy of `model` whose decoder takes `positions` positions (RoPE has no table, so
    the parameters are the same)."""
    out = copy.copy(model)
    out.config = dataclasses.replace(model.config, decoder=dataclasses.replace(
        model.config.decoder, max_position_embeddings=positions))
    return out


class UniTokenPipeline:
    """A model with its text tokenizer and VQ-GAN, for inference: `understand` (answers about
    pictures), `generate_image`, `edit`, `chat`, and `run` over any mix of the requests the
    `*_request` methods make, in one batch (`unitoken_jax.world.default.pipeline()`: the bundled
    model's)."""

    def __init__(self, model, tokenizer, vq, *, anyres: bool | None = None, vq_size: int | None = None,
                 siglip_size: int | None = None, image_prefix: Sequence[int] | None = None,
                 generate_template: str | None = None, max_length: int | None = None,
                 continuous: bool | None = None,
                 cache_growth: int | None = None, default_size: tuple[int, int] | None = None, anyres_pinpoints=None,
                 cache_block: int | None = None, layers: str = "auto", trained_sizes=None):
        """`default_size`: (width, height) of a picture drawn or edited without a `size` (the
        bundled model's pipeline: its 64 x 64; None: the size whose code grid the model's training
        pictures had, where it records their crop (`trained_size`), else 512 x 512);
        `trained_sizes`: the (width, height)s the model was trained to draw, if it is known to draw
        no other (the bundled model's: 64 x 64): another warns `UntrainedSize` (its pictures come
        out as noise); None: those its record (`TRAINED_PICTURES`) lists as `sizes`, else any.
        `image_prefix` and `generate_template` too default to its record's (the bundled model's
        directory has one, so that a copy of it loaded as --model draws as it does). Other defaults
        come from the model: `image_prefix` the reference's 16853 where the vocabulary has that id
        (none otherwise), `vq_size` 512 or, for a model too short for 512 px of codes, the largest halving
        whose code grid takes at most a quarter of its length, `siglip_size` and the patch from its
        vision tower. `cache_growth`: see `DecodeLoop` (on a CPU, e.g. 128: a few per cent faster
        steps at most, more compiles on the first call); `cache_block` too (a scanned loop's cache
        read in blocks, the filled ones only: a CPU's default, opt-in on accelerators, where an H200
        ran it slower) and `layers` ("auto", "scan" or "unrolled": how the decode loop runs the
        layer stack; `auto` unrolls float weights on a CPU or one GPU with room for its copy of
        them, `inference.decode.auto_layers`). `anyres_pinpoints`: the canvases AnyRes tiles a
        picture on, as the model was trained (the pre-tokenizer's `anyres_grid_pinpoints`); None:
        the reference's, scaled to the tile size. `anyres`: pictures' SigLIP features laid out the
        AnyRes way (a model trained so); `generate_template`: the prompt a picture is asked for with
        ({w}, {h}, {prompt}; the reference's by default); `max_length`: the longest sequence a
        request may be (default: the model's positions); `continuous=False`: pictures as VQ codes
        only, no SigLIP features (a model trained without them). `anyres` and `continuous` default
        to what a model trained here records of its data (`TRAINED_PICTURES`), else False and True
        (the base release's layout)."""
        self.model, self.tokenizer, self.vq = model, tokenizer, vq
        trained = trained_record(model)  # (read once: the defaults below come from it)
        if trained_sizes is None and isinstance(trained.get("sizes"), list):
            trained_sizes = trained["sizes"]
        self.trained_sizes = None if trained_sizes is None else [_size_pair(x) for x in trained_sizes]
        vocab = model.config.decoder.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocabulary of "
                             f"{vocab}: its ids past {vocab - 1} would index nothing (NaN or empty answers). Use the "
                             "tokenizer the model was trained with")
        if image_prefix is None and isinstance(trained.get("image_prefix"), list):
            image_prefix = trained["image_prefix"]
        if image_prefix is None:
            image_prefix = REFERENCE_IMAGE_PREFIX if all(i < vocab for i in REFERENCE_IMAGE_PREFIX) else ()
        if generate_template is None:
            generate_template = trained.get("generate_template") or GENERATE_TEMPLATE
        check_trained_tokenizer(model, trained, tokenizer)
        check_trained_vqgan(model, trained, vq)
        if anyres is None:
            anyres = trained.get("anyres") is True
        if continuous is None:
            continuous = trained.get("continuous") is not False
        if vq_size is None:
            vq_size = trained_vq_size(trained) or default_vq_size(model.config.decoder.max_position_embeddings, vq)
        self.anyres, self.vq_size, self.continuous = anyres, vq_size, continuous
        # (a model trained here on another VQ-GAN's crop, e.g. the demo's 32 px at 4 px a code: 512 x 512
        # asked for a grid it never drew, and too long for a tiny model; `unitoken edit` failed unasked)
        self.default_size = _size_pair(default_size if default_size is not None else
                                       trained_size(trained, vq) or (512, 512))
        vision = model.config.vision
        self.siglip_size = siglip_size or (vision.image_size if vision is not None else 384)
        self.patch = vision.patch_size if vision is not None else 14
        # (checked now, not at the first request; None or empty: the defaults)
        self.anyres_pinpoints = (None if anyres_pinpoints is None or len(anyres_pinpoints) == 0
                                 else anyres_lib.check_pinpoints(anyres_pinpoints, self.siglip_size))
        self.image_prefix = image_prefix
        self.generate_template = check_template(generate_template)
        if anyres and continuous and vision is not None:
            # the reference spends the model's positions on a conversation's discrete tokens and puts an
            # AnyRes picture's SigLIP block on top (`anyres.max_block`): the decoder's limit here does too
            block = anyres_lib.max_block(self.siglip_size, self.patch, self.anyres_pinpoints)
            self.model = model = with_positions(model, model.config.decoder.max_position_embeddings + block)
        self.max_length = max_length or model.config.decoder.max_position_embeddings
        # a VQ-GAN with fewer codes than the tokenizer names (small ones trained here) bans the rest
        banned = tokenizer.code_to_bpe[vq.config.n_embed:] if vq is not None else None
        self.decode_loop = DecodeLoop(model.config, model.params, model.mesh, banned_ids=banned,
                                      cache_growth=cache_growth, cache_block=cache_block, layers=layers)

    # --- requests -------------------------------------------------------------------------------
    @property
    def image_prefix(self) -> list[int]:
        """Ids put before <racm3:break> when asking for a picture; set only to ids of the model's vocabulary."""
        return self._image_prefix

    @image_prefix.setter
    def image_prefix(self, ids: Sequence[int]) -> None:
        vocab = self.model.config.decoder.vocab_size
        ids = list(ids)
        wrong = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if wrong:
            raise ValueError(f"image_prefix must be token ids (integers), got {wrong}")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"image_prefix ids {bad} are outside the model's vocabulary of {vocab}")
        self._image_prefix = [int(i) for i in ids]

    def _encode(self, item):
        enc, pixels = encode_item(item, self.tokenizer, self.vq, anyres=self.anyres, vq_size=self.vq_size,
                                  siglip_size=self.siglip_size, patch=self.patch,
                                  max_length=self.max_length, continuous=self.continuous,
                                  anyres_pinpoints=self.anyres_pinpoints)
        has_images = bool(enc.is_continuous.any())
        return dict(tokens=enc.tokens, is_continuous=enc.is_continuous if has_images else None,
                    feature_index=enc.feature_index if has_images else None, pixels=pixels if has_images else None)

    def understand_request(self, images, question: str, **options) -> Request:
        """The request `understand` runs for one question about `images` (one picture or a list),
        for `run`; `options`: `Request`'s sampling fields (max_new_tokens 256 by default)."""
        images = _listify(images)
        value = "".join(IMAGE_PLACEHOLDER for _ in images) + ("\n" if images else "") + _plain(question, "question")
        item = {"conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": None}], "image": images}
        # (cfg_scale took a second, unconditional row for an answer in words, which guidance never acts on)
        _check_options(options, not_here=_PICTURE_OPTIONS,
                       why="understand answers in words, and it acts on pictures (chat's answers may draw)")
        return Request(**self._encode(item), **{"max_new_tokens": 256, **options})

    def _image_request(self, item, size, cfg, negative_prompt, **options) -> Request:
        _check_options(options, {"cfg_scale": "cfg", "grid_hw": "size"}, not_here=_DRAWING_FIELDS,
                       why="a picture request draws one picture of its size, then ends")
        called = {"cfg_scale": "cfg"}  # the Request's names of options -> the caller's
        for text_option, image_option in _IMAGE_SAMPLING.items():
            if text_option in options:
                if image_option in options:
                    raise ValueError(f"{text_option} and {image_option} both given: a picture request samples "
                                     f"codes only, and {text_option} is {image_option}'s other name there")
                options[image_option] = options.pop(text_option)
                called[image_option] = text_option
        if negative_prompt is not None and cfg == 1:
            raise NegativePromptError("a negative prompt acts only through guidance, and cfg=1 is none: give cfg "
                                      "other than 1 (3 by default) or leave the negative prompt out")
        (w, h), grid_hw = self._grid(self.default_size if size is None else size)
        encoded = self._encode(item)
        prompt = len(encoded["tokens"]) + len(self.image_prefix)
        needed = prompt + layout.generated_image_length(grid_hw)
        if needed > self.max_length:  # (said as the size's fault alone before, though it was the prompt's)
            said = (f"the prompt takes {prompt} positions and a {w}x{h} picture {needed - prompt}: {needed} in all, "
                    f"more than the model's {self.max_length}")
            fits = self._largest_fitting(prompt, w * h)
            if fits is None:
                raise SequenceTooLong(f"{said} (shorten the prompt)")
            raise PictureTooLarge(f"{said} (ask for a smaller size: {fits[0]}x{fits[1]} fits beside this prompt; or "
                                  "shorten the prompt)", fits)
        self._check_trained_size(w, h)
        encoded["tokens"] = np.concatenate([encoded["tokens"], self.image_prefix + [layout.IMAGE_START]]).astype(np.int32)
        if encoded["is_continuous"] is not None:
            pad = len(self.image_prefix) + 1
            encoded["is_continuous"] = np.concatenate([encoded["is_continuous"], np.zeros(pad, bool)])
            encoded["feature_index"] = np.concatenate([encoded["feature_index"], np.zeros(pad, np.int32)])
        uncond = None
        if negative_prompt is not None:
            try:
                neg = {"conversations": [{"from": "human", "value": _plain(negative_prompt, "negative prompt")},
                                         {"from": "gpt", "value": None}]}
            except ConversationError as e:
                raise NegativePromptError(str(e)) from None
            try:
                neg_tokens = self._encode(neg)["tokens"]
            except ConversationError as e:
                raise (NegativePromptTooLong if isinstance(e, SequenceTooLong) else NegativePromptError)(
                    f"the negative prompt: {e}") from None
            uncond = np.concatenate([neg_tokens, self.image_prefix + [layout.IMAGE_START]])
            needed = len(uncond) - 1 + layout.generated_image_length(grid_hw)  # its row runs beside the prompt's
            if needed > self.max_length:
                raise NegativePromptTooLong(f"the negative prompt and a {w}x{h} picture need {needed} positions; the "
                                          f"model takes {self.max_length} (a shorter negative prompt or a smaller "
                                          "size)")
        defaults = {"image_temperature": 1.0, "image_top_k": 2000,
                    "max_new_tokens": layout.generated_image_length(grid_hw) - 1,  # the prompt has <racm3:break>
                    "stop_after_image": True}
        try:
            return Request(**encoded, grid_hw=grid_hw, cfg_scale=cfg, uncond_tokens=uncond, **{**defaults, **options})
        except OptionError as e:  # a refused value, by the name the caller gave it (cfg=-1, not cfg_scale=-1)
            if e.option == "grid_hw":
                raise _too_large(w, h, Request.max_grid) from None
            if e.option not in called:
                raise
            raise e.renamed(called[e.option]) from None

    @staticmethod
    def _grid(size) -> tuple[tuple[int, int], tuple[int, int]]:
        """((width, height), (grid rows, grid columns)) of a picture size in pixels, refused by value
        unless positive multiples of 32."""
        w, h = _size_pair(size)
        unit = layout.PIXELS_PER_GRID
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (w, h)) \
                or w % unit or h % unit:
            raise ValueError(f"image size {w}x{h} must be positive and a multiple of {unit} pixels each way")
        return (w, h), (h // unit, w // unit)

    def _check_trained_size(self, w: int, h: int) -> None:
        if self.trained_sizes is not None and (w, h) not in self.trained_sizes:
            known = " or ".join(f"{a}x{b}" for a, b in self.trained_sizes)
            _say(UntrainedSize(f"this model was trained to draw {known} pictures only, not {w}x{h}: it never saw "
                               "that size, and its pictures come out as noise"))

    def _largest_fitting(self, prompt: int, area: int) -> tuple[int, int] | None:
        """The largest picture size, smaller than `area` pixels, that fits beside a prompt of `prompt`
        positions: of the sizes the model was trained on where it records them, else square."""
        unit = layout.PIXELS_PER_GRID
        sizes = (self.trained_sizes if self.trained_sizes is not None else
                 [(k * unit, k * unit) for k in range(1, self.max_length // unit + 2)])
        fitting = [(w, h) for w, h in sizes if w * h < area and prompt + layout.generated_image_length(
            (h // unit, w // unit)) <= self.max_length]
        return max(fitting, key=lambda s: s[0] * s[1], default=None)

    def generate_request(self, prompt: str, *, size=None, cfg: float = 3.0, negative_prompt=None,
                         **options) -> Request:
        """The request for one picture of `prompt`, for `run`. `size`: (width, height) in pixels,
        multiples of 32; None: the pipeline's `default_size`. `cfg`: classifier-free guidance's
        scale (1: none); `negative_prompt`: the unconditional row's text (needs cfg != 1);
        `options`: `Request`'s sampling fields, where temperature / top_k / top_p set the image
        codes' sampling."""
        _texts([prompt], "prompt")
        w, h = _size_pair(self.default_size if size is None else size)
        text = self.generate_template.format(w=w, h=h, prompt=_plain(prompt, "prompt"))
        item = {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": None}]}
        try:
            return self._image_request(item, (w, h), cfg, negative_prompt, **options)
        except SequenceTooLong as e:  # (the prompt alone too long: the tokenizer's words name no field)
            if e.positions is None:
                raise
            raise SequenceTooLong(f"the prompt takes {e.positions} positions, more than the maximum length "
                                  f"{e.max_length} (shorten the prompt)") from None

    def edit_request(self, image, instruction: str, *, size=None, cfg: float = 3.0, negative_prompt=None,
                     **options) -> Request:
        """The request `edit` runs for one picture and instruction, for `run` (the size, CFG and
        options as `generate_request` takes them)."""
        _texts([instruction], "instruction")
        # the reference's order (its image-to-image demo and TRAIN.md's examples): the instruction, then the picture
        value = f"{_plain(instruction, 'instruction')} {IMAGE_PLACEHOLDER}"
        item = {"conversations": [{"from": "human", "value": value},
                                  {"from": "gpt", "value": None}], "image": [image]}
        try:
            return self._image_request(item, size, cfg, negative_prompt, **options)
        except SequenceTooLong as e:  # (the tokenizer's words name no field)
            if e.positions is None:  # (a picture alone too long: said as it is)
                raise
            raise SequenceTooLong(f"the instruction and its picture take {e.positions} positions, more than the "
                                  f"maximum length {e.max_length} (shorten the instruction)") from None

    def chat_request(self, messages: list[dict[str, Any]], images=(), *, cfg: float = 1.0, size=None,
                     **options) -> Request:
        """The request `chat` runs for a conversation (`messages` as `chat` takes them), for `run`;
        its answer may hold text and pictures. `cfg`: classifier-free guidance for a picture the
        answer draws, from its <racm3:break> on (1: none, the default here and in the server;
        `unitoken chat --cfg` defaults to 3): a guided answer takes a second row for every token,
        words too. `size`: (width, height) in pixels that a picture it draws must have (default:
        the model's choice, or its one trained size). `options`: `Request`'s sampling fields
        (temperature / top_k / top_p for words, image_temperature / image_top_k / image_top_p for
        picture codes, max_new_tokens: 2,048 by default; allow_images=False: words only)."""
        if isinstance(messages, (str, dict)) or not len(messages):
            raise ValueError(f"messages must be a list of turns ({{'from': 'human', 'value': ...}} first), got "
                             f"{messages!r:.80}")
        item = {"conversations": list(messages) + [{"from": "gpt", "value": None}], "image": _pictures(images)}
        _check_options(options, {"cfg_scale": "cfg", "grid_hw": "size"})
        if size is not None:
            (w, h), options["grid_hw"] = self._grid(size)
            self._check_trained_size(w, h)
        try:
            request = Request(**self._encode(item), **{"max_new_tokens": CHAT_MAX_NEW_TOKENS, "allow_images": True,
                                                       "cfg_scale": cfg, **options})
        except OptionError as e:  # (cfg=-1 named as the caller gave it; a size in pixels)
            if e.option == "grid_hw":
                raise _too_large(w, h, options.get("max_grid", Request.max_grid)) from None
            raise (e.renamed("cfg") if e.option == "cfg_scale" else e) from None
        if not request.allow_images and request.cfg_scale != 1.0:
            # guidance acts on pictures alone, and this answer draws none: the same answer without the
            # unconditional row it would take in a batch (a server's --max-batch counted it)
            request = dataclasses.replace(request, cfg_scale=1.0, uncond_tokens=None)
        if request.allow_images and request.grid_hw is None and self.trained_sizes is not None:
            # a model known to draw only some sizes picks its pictures' size tokens itself in a chat: the
            # bundled one drew 960 x 64 noise, unsaid. One size: its grid is forced; several: the grid
            # is kept to the largest side (a size between them is the model's choice)
            unit = layout.PIXELS_PER_GRID
            if len(self.trained_sizes) == 1:
                (w, h), = self.trained_sizes
                request = dataclasses.replace(request, grid_hw=(h // unit, w // unit))
            else:
                side = max(max(w, h) for w, h in self.trained_sizes) // unit
                request = dataclasses.replace(request, max_grid=min(request.max_grid, side))
        return request

    # --- running --------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], *, progress: bool = False, repair: bool = True,
            reuse_cache: bool = False, stream: Callable[[int, str], None] | None = None) -> list[list]:
        """Generates all requests as one batch; each result is [text, picture, ...]. `reuse_cache`:
        see `DecodeLoop.generate` (what `chat` does). `stream(i, text)` gets request i's new text
        while it is generated, after every chunk of decoding steps: the text before its first
        picture, as `TextStream` settles it (the finished first part starts with all of it). An
        answer cut by its budget or the model's end warns (`AnswerCut`; a picture it cut is completed
        by the repair rules of `layout.parse_image_ids` and warns `PictureRepaired`). With
        `repair=False` a malformed picture raises `MalformedImageTokens` instead, which loses the
        whole batch's results. No requests: no results (nothing runs)."""
        if not requests:
            return []
        results, cut, repaired = self._run_batch(requests, progress=progress, repair=repair, reuse_cache=reuse_cache,
                                                 stream=stream)
        self._warn_cut(cut, repaired, single=len(requests) == 1)
        return results

    def _run_batch(self, requests: Sequence[Request], *, progress: bool = False, repair: bool = True,
                   reuse_cache: bool = False, stream: Callable[[int, str], None] | None = None, first: int = 0):
        """`run`'s work for one batch, whose requests are numbered from `first`: (results, the
        answers cut [(number, by its budget (else the model's end), budget)], the pictures
        completed [(number, request, (h, w) codes, changes)])."""
        bar = None
        updates = []
        drawn = [r.grid_hw if r.starts_in_picture else None for r in requests]  # (a chat's picture may not come)
        total_rows = sum(g[0] * layout.CODES_PER_GRID for g in drawn if g is not None)
        if progress and total_rows:

            bar = tqdm(total=total_rows, desc="image rows", unit="row")
            heights = np.array([(g[0] * layout.CODES_PER_GRID if g else 0) for g in drawn])

            def draw_bar(info):
                n = len(requests)
                drawn = np.minimum(info["rows_drawn"][:n] + info["images_done"][:n] * heights, heights)
                bar.update(int(drawn.sum()) - bar.n)
            updates.append(draw_bar)
        if stream is not None:
            texts = [TextStream(self.tokenizer, [], starts_in_picture=r.starts_in_picture)
                     for r in requests]

            def send_text(info):
                for i, text in enumerate(texts):
                    new = text.update(info["out"][i, :info["n_out"][i]])
                    if new:
                        stream(first + i, new)
            updates.append(send_text)

        def callback(info):
            for update in updates:
                update(info)

        out = self.decode_loop.generate(requests, progress=callback if updates else None, reuse_cache=reuse_cache)
        if bar is not None:
            bar.update(total_rows - bar.n)
            bar.close()
        results, cut, repaired = [], [], []
        for i, (request, drawn) in enumerate(zip(requests, out.tokens)):
            ids = np.concatenate([[layout.IMAGE_START], drawn]) if request.starts_in_picture else drawn
            repairs = []
            finished = ended(drawn, request.stop_tokens, stop_after_image=request.stop_after_image)
            results.append(decode(ids, self.tokenizer, self.vq, repair=repair, repairs=repairs,
                                  unfinished=not finished))
            by_budget = len(drawn) >= request.max_new_tokens
            repaired += [(first + i, request, shape, changes, by_budget) for shape, changes in repairs]
            if not repairs and not finished:
                cut.append((first + i, by_budget, request.max_new_tokens))
        return results, cut, repaired

    def _warn_cut(self, cut, repaired, *, single: bool) -> None:
        """Never silently: a picture that is not what the model drew, and answers that stopped early."""
        for i, request, shape, changes, by_budget in repaired:
            # (what stopped it: its budget, else the model's last position)
            limit = (f"max_new_tokens={request.max_new_tokens}" if by_budget else
                     f"the model's last position ({self.max_length})")
            if shape is None:  # nothing to complete
                _say(PictureRepaired(f"answer {i}: the picture it started was {changes[0]} (stopped at {limit})"))
                continue
            h, w = shape
            grid = (h // layout.CODES_PER_GRID, w // layout.CODES_PER_GRID)
            size = f"{grid[1] * layout.PIXELS_PER_GRID}x{grid[0] * layout.PIXELS_PER_GRID}"
            _say(PictureRepaired(f"answer {i}: its {size} picture did not finish before {limit} (a picture that size "
                                 f"takes {layout.generated_image_length(grid)} tokens) and was completed: "
                                 f"{'; '.join(changes)}"))
        if cut:
            where = [f"max_new_tokens={budget}" if by_budget else f"the model's last position ({self.max_length})"
                     for _, by_budget, budget in cut]
            said = (f"the answer stopped at {where[0]} before its end" if single else
                    "answers stopped before their end: " + ", ".join(f"{i} at {w}" for (i, *_), w in zip(cut, where)))
            _say(AnswerCut(said, [(i, w) for (i, *_), w in zip(cut, where)]))

    def _in_batches(self, n: int, make: Callable[[int], Request], batch_size: int | None, *, what: str,
                    stream=None, bar: bool = True, named: bool = False, **run_options) -> list[list]:
        """`run` over requests `make(0)`, ..., `make(n - 1)`, `batch_size` at a time (None: all at
        once), each batch's requests made just before it runs (a batch's pictures are read then),
        with a bar over the batches' `what`; one warning for every cut answer of all batches.
        `named`: `make` names the item a request it cannot make was (else "request i")."""
        batch_size = _whole(batch_size)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a whole number, at least 1; got {batch_size!r}")
        if n > 1 and not named:  # which of the batch a conversation the model cannot take is (it had named none)
            make_one = make

            def make(i):
                return _naming(lambda: make_one(i), f"request {i}")
        if batch_size is None or n <= batch_size:
            requests = [make(i) for i in range(n)]
            return self.run(requests, stream=stream, **run_options)
        results, cut, repaired = [], [], []
        with tqdm(total=n, desc=what, unit=what.rstrip("s"), disable=not bar) as counter:
            for first in range(0, n, batch_size):
                batch = [make(i) for i in range(first, min(n, first + batch_size))]
                out, batch_cut, batch_repaired = self._run_batch(batch, stream=stream, first=first,
                                                                 **{**run_options, "progress": False})
                results += out
                cut += batch_cut
                repaired += batch_repaired
                counter.update(len(batch))
        self._warn_cut(cut, repaired, single=False)
        return results

    def understand(self, images, question, *, stream: Callable | None = None, batch_size: int | None = None,
                   progress: bool = True, **options):
        """Answers; a list of questions (with a list of image lists) runs as one batch, or
        `batch_size` at a time (a bar counts the answers, `progress=False`: none; each batch's
        pictures are read when it runs: captioning a folder of thousands). `stream` gets the text as it is generated:
        `stream(text)` for one question, `stream(i, text)` for a list (as the answer is a string
        or a list)."""
        single, questions, image_sets = _paired(question, "question", images, list, "lists of pictures",
                                                "one list of pictures (maybe empty) a question")
        if stream is not None and single:
            send = stream
            stream = lambda _, text: send(text)  # noqa: E731 (one question: its text alone)
        results = self._in_batches(len(questions), lambda i: self.understand_request(image_sets[i], questions[i],
                                                                                     **options),
                                   batch_size, what="answers", stream=stream, bar=progress)
        texts = ["".join(p for p in parts if isinstance(p, str)) for parts in results]
        return texts[0] if single else texts

    def generate_image(self, prompt, *, size=None, cfg: float = 3.0, n: int = 1, seed: int = 0,
                       progress: bool = True, batch_size: int | None = None,
                       **options) -> list[Image.Image] | list[list[Image.Image]]:
        """n pictures per prompt (seeds seed, seed+1, ..., modulo 2**32); a list of prompts gives a list of lists.
        All pictures are drawn as one batch (a bar counts image rows), or `batch_size` pictures at
        a time (a bar counts pictures). `size`, `cfg`, `negative_prompt` and the sampling options
        as `generate_request` takes them; `progress=False`: no bar."""
        n = _pictures_a_call(n)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else _texts(prompt, "prompt")
        # every request made before the first batch runs (they hold no picture: cheap), so that a prompt
        # the model cannot take is refused before anything is drawn
        requests = [_naming(lambda: self.generate_request(prompts[k // n], size=size, cfg=cfg,
                                                          seed=_seed_of(seed, k % n),
                                                          **options), None if single else f"prompt {k // n}")
                    for k in range(len(prompts) * n)]
        results = self._in_batches(len(requests), requests.__getitem__, batch_size, what="pictures",
                                   bar=progress, progress=progress)
        pics = [[x for x in r if not isinstance(x, str)][0] for r in results]
        grouped = [pics[i * n:(i + 1) * n] for i in range(len(prompts))]
        return grouped[0] if single else grouped

    def edit(self, image, instruction, *, size=None, cfg: float = 3.0, seed: int = 0, n: int = 1,
             progress: bool = True, batch_size: int | None = None, **options):
        """The edited picture; a list of instructions with a list of pictures (one each) gives a
        list of pictures, drawn as one batch, or `batch_size` edits at a time (each batch's pictures
        read just before it). `n` > 1: n edits of each (seeds seed, seed+1, ..., modulo 2**32), a
        list of n pictures where there was one. `size` (default: the pipeline's `default_size`),
        `cfg`, `seed`, `negative_prompt` and the sampling options (temperature / top_k / top_p: the
        image codes') as `generate_image` takes them; `progress=False`: no bar."""
        n = _pictures_a_call(n)
        single, instructions, pictures = _paired(instruction, "instruction", image, _pictures, "pictures",
                                                 "one picture an instruction")
        if single and isinstance(image, (list, tuple)):  # one instruction: its picture, or a list of just it
            if len(image) != 1:
                raise ValueError(f"one instruction and {len(image)} pictures: an edit takes one picture (for "
                                 "several edits, give a list of instructions, one a picture)")
            pictures = [image[0]]
        def make(m):  # edit m: instruction m // n, its seed's offset m % n
            k, j = divmod(m, n)
            return _naming(lambda: self.edit_request(pictures[k], instructions[k], size=size, cfg=cfg,
                                                     seed=_seed_of(seed, j), **options),
                           None if single else f"instruction {k}")

        # (all at once had been the only way: `unitoken edit --n 100000` held 15 GB and drew nothing in 10 minutes)
        results = self._in_batches(len(instructions) * n, make, batch_size, what="edits", bar=progress, named=True,
                                   progress=progress)
        edited = [[x for x in result if not isinstance(x, str)][0] for result in results]
        if n > 1:
            edited = [edited[k * n:(k + 1) * n] for k in range(len(instructions))]
        return edited[0] if single else edited

    def chat(self, messages, images=(), *, stream: Callable[[str], None] | None = None, **options) -> list:
        """The next assistant turn of a conversation: [text, picture, ...]. A picture the model
        starts but `max_new_tokens` cuts off is completed by the repair rules of
        `layout.parse_image_ids` (with a `PictureRepaired` warning) rather than raising.
        `stream(text)` gets the answer's text as it is generated (up to its first picture; the
        returned first part starts with all that was streamed), e.g. `stream=lambda t: print(t,
        end="", flush=True)`. `cfg`, `size` and the sampling options: as `chat_request` takes them
        (guidance off by default: `cfg=3.0` guides a picture as `unitoken chat` does).

        The conversation's earlier turns are not computed again: the positions this call's prompt
        shares with the previous chat call's prompt and answer come from that call's KV cache,
        which the decode loop keeps on the device until a call that is not a chat turn."""
        (result,) = self.run([self.chat_request(messages, images, **options)], repair=True, reuse_cache=True,
                             stream=None if stream is None else lambda _, text: stream(text))
        return result
