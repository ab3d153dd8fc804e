"""OpenAI's wire format: request bodies checked and read into plain calls, responses and errors
written the way the official clients parse them.

Every refusal is an `APIError`, sent as `{"error": {"message", "type", "param", "code"}}` with
its HTTP status; `param` names the field of the request that was wrong, in the request's own
spelling (`messages[0].content[1].image_url`).

How the model's pictures travel in a chat completion: `message.content` is a plain string when
the answer is text only (as OpenAI sends it), and a list of parts in the order the model wrote
them when the answer has a picture:

    [{"type": "text", "text": "..."},
     {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]

the same parts a client sends a picture in, so a conversation goes back to the server as it came.
Streamed, text comes as `delta.content` strings while it is generated
(`tokenizer.conversation.TextStream`) and each picture, when it is finished, as a chunk of its own whose `delta.content` is a list holding its
one image part.

Pictures come in as data URLs (`data:image/png;base64,...`) only, PNG, JPEG, WebP or GIF: the
server never fetches a URL or opens a file a client names.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import re
import time
import uuid
from typing import Any

from PIL import Image

from unitoken_jax.tokenizer.conversation import IMAGE_PLACEHOLDER, first_stop
from unitoken_jax.tokenizer.images import MAX_PIXELS, ImageError, load_image
from unitoken_jax.tokenizer.text import not_unicode

SEED_LIMIT = 2 ** 32  # seeds are uint32, as the decode loop's keys take them
PICTURE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# The containers a picture may come in, told by their first bytes: PIL could open many more
# (EPS through Ghostscript among them), which a server has no reason to let a client reach.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))


class APIError(Exception):
    """A request refused (or failed) with an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass
class Limits:
    """What one request may ask for."""

    max_n: int = 8  # choices of a chat completion, pictures of an images call
    max_image_bytes: int = 8 * 1024 * 1024  # one picture, decoded
    max_image_pixels: int = MAX_PIXELS  # (a phone's 12-50 megapixel photo: 4096 x 4096 refused them)
    max_images: int = 8  # pictures in one request's messages


# --- reading fields -------------------------------------------------------------------------------
def _number(body: dict, name: str, default, low: float, high: float = math.inf, *, integer: bool = False,
            low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    show = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")
    bounds = (f"{'greater than' if low_open else 'at least'} {show(low)}" if high == math.inf else
              f"in {'(' if low_open else '['}{show(low)}, {show(high)}]")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # (no float holds it, and its digits may pass what Python will print)
        raise bad(f"'{name}' is an integer of {value.bit_length()} bits; it must be {bounds}", name, "invalid_value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and not float(value).is_integer()):
        raise bad(f"'{name}' must be a finite {'integer' if integer else 'number'}, got {value!r}", name)
    if value < low or (low_open and value == low) or value > high:
        raise bad(f"'{name}' is {value!r}; it must be {bounds}", name, "invalid_value")
    return int(value) if integer else float(value)


def _seed(body: dict) -> int | None:
    """Any integer (OpenAI types `seed` as one; clients send 64-bit and negative ones), folded into
    the decode loop's uint32 seeds."""
    seed = _number(body, "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True)
    return None if seed is None else seed % SEED_LIMIT


def _text(body: dict, name: str, default=None, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"'{name}' is required", name, "missing_required_parameter")
        return default
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {type(value).__name__}", name)
    if required and not value.strip():
        raise bad(f"'{name}' is empty", name)
    return _unicode(value, f"'{name}'", name)


def _unicode(value: str, what: str, param: str) -> str:
    """`value`, refused by name when it holds a lone surrogate (JSON's "\\ud800"): the tokenizer's
    error had named no field, and a stop string of one could never match."""
    why = not_unicode(value)
    if why:
        raise bad(f"{what} holds a character that is not valid Unicode ({why})", param)
    return value


def _refuse_unknown(body: dict, known: set[str], neutral: dict[str, tuple], where: str) -> None:
    """Fields this server does not implement are refused unless they hold their neutral value:
    a request is never answered as if it had asked for something else."""
    for name, value in body.items():
        if name in known:
            continue
        if name in neutral:
            # (a bool is not its number: logprobs=0 or frequency_penalty=false is a wrong type, not neutral)
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral[name]):
                raise bad(f"'{name}'={value!r} is not supported by this server ({where})", name,
                          "unsupported_parameter")
            continue
        raise bad(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", param="model",
                       code="model_not_found")


# --- pictures in ----------------------------------------------------------------------------------
def read_picture(raw: bytes, what: str, limits: Limits) -> Image.Image:
    """Bytes of a PNG, JPEG, WebP or GIF file -> RGB(A) PIL image, or a 400 naming `what`."""
    if len(raw) > limits.max_image_bytes:  # (an upload is read only this far: its whole size is not known)
        raise bad(f"{what}: the picture is more than {limits.max_image_bytes} bytes, this server's limit", what,
                  "image_too_large")
    kind = next((k for magic, k in _MAGIC if raw.startswith(magic)), None)
    if kind is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        raise bad(f"{what}: not a picture (PNG, JPEG, WebP or GIF)", what, "invalid_image")
    try:
        return load_image(raw, max_pixels=limits.max_image_pixels, what=what)
    except ImageError as e:
        raise bad(str(e), what, "invalid_image") from None


_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII | re.IGNORECASE)  # (a URL's scheme, a MIME type and "base64" have no case)


def read_data_url(url: Any, what: str, limits: Limits) -> Image.Image:
    if not isinstance(url, str):
        raise bad(f"{what} must be a string (a data URL), got {type(url).__name__}", what)
    match = _DATA_URL.match(url)
    if match is None:
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise bad(f"{what}: {shown!r} is not a data URL. This server reads pictures only from data URLs "
                  "(data:image/png;base64,...); it never fetches a URL or opens a file", what, "invalid_image_url")
    if not match["b64"]:
        raise bad(f"{what}: the data URL must be base64 encoded (data:image/png;base64,...)", what, "invalid_image_url")
    data = url[match.end():]
    if any(c in data for c in " \t\r\n"):  # MIME's base64 breaks its lines every 76 characters
        data = "".join(data.split())
    if len(data) * 3 // 4 > limits.max_image_bytes + 3:
        raise bad(f"{what}: the picture is about {len(data) * 3 // 4} bytes; this server takes at most "
                  f"{limits.max_image_bytes}", what, "image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{what}: the data URL's base64 is malformed", what, "invalid_image_url") from None
    return read_picture(raw, what, limits)


# --- chat completions -----------------------------------------------------------------------------
@dataclasses.dataclass
class ChatCall:
    conversation: list[dict[str, str]]  # the pipeline's turns: {"from": "human" | "gpt", "value": ...}
    images: list[Image.Image]  # in the order of the <|image|> placeholders
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    guidance_scale: float  # CFG for a picture the answer draws (1 = off; a guided call takes two rows)
    allow_images: bool = True  # False: `modalities: ["text"]`, an answer in text alone
    length_field: str = "max_tokens"  # the length limit as the request spelt it (max_completion_tokens)


_CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                "n", "stop", "stream", "stream_options", "guidance_scale", "user", "metadata", "service_tier",
                "safety_identifier", "prompt_cache_key", "modalities"}
_CHAT_NEUTRAL = {"logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
                 "presence_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
                 "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
                 "response_format": (None, {"type": "text"}), "store": (None, False),
                 # OpenAI's fields for what this model does not do: absent, null or their plain-text value
                 "audio": (None,), "functions": (None, []), "function_call": (None,),
                 "reasoning_effort": (None,), "prediction": (None,), "web_search_options": (None,),
                 "verbosity": (None, "medium")}


def _content(content: Any, where: str, images: list | None, limits: Limits) -> str:
    """A message's content -> the conversation's text, a picture as <|image|>: parts in order,
    a newline between two parts except between two pictures (as `understand_request` writes
    "<|image|><|image|>\\nquestion"). `images` None: text only (a system message)."""
    if isinstance(content, str):
        parts = [("text", content, f"{where}.content")]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(("text", part.get("text"), f"{at}.text"))
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                parts.append(("image", url, f"{at}.image_url"))
            else:
                raise bad(f"{at}: a content part must be {{'type': 'text'}} or {{'type': 'image_url'}}, got "
                          f"{kind!r}", at)
    else:
        raise bad(f"{where}.content must be a string or a list of parts, got {type(content).__name__}",
                  f"{where}.content")
    pieces, previous = [], None
    for kind, value, at in parts:
        if kind == "text":
            if not isinstance(value, str):
                raise bad(f"{at} must be a string", at)
            if IMAGE_PLACEHOLDER in value:
                raise bad(f"{at} contains {IMAGE_PLACEHOLDER}, which marks a picture for the model; send "
                          "pictures as image_url parts", at)
            text = _unicode(value, at, at)
        else:
            if images is None:
                raise bad(f"{at}: a system message takes text only", at)
            if len(images) >= limits.max_images:
                raise bad(f"{at}: more than {limits.max_images} pictures in one request", at, "too_many_images")
            images.append(read_data_url(value, at, limits))
            text = IMAGE_PLACEHOLDER
        if previous is not None and not (previous == kind == "image"):
            pieces.append("\n")
        pieces.append(text)
        previous = kind
    return "".join(pieces)


def parse_chat(body: dict, model_name: str, limits: Limits) -> ChatCall:
    """A chat completion request -> a `ChatCall`. The models have no system turn of their own:
    system (and developer) messages before the first user message go before its text, later ones
    before the next user message's (or after the last one's), a newline between. Consecutive
    messages of one role are one turn (their contents joined by a newline), an assistant message
    with no content (tool calls only) is an empty turn; a conversation opening with the assistant (a
    greeting) gets an empty user turn before it (holding the system messages' text), and it ends
    with the user, whom the model answers (system messages alone are the user's turn)."""
    check_model(body, model_name)
    _refuse_unknown(body, _CHAT_FIELDS, _CHAT_NEUTRAL, "chat completions")
    _text(body, "user")  # (OpenAI's: a string naming the end user; read by nothing here)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages", "missing_required_parameter")
    system, turns, images = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_content(message.get("content"), where, None, limits))
        elif role in ("user", "assistant"):
            content = message.get("content")
            if content is None and role == "user":
                raise bad(f"{where} has no content", f"{where}.content")
            if not turns and role == "assistant":  # a greeting first (chat UIs open so): an empty user turn
                turns.append({"from": "human", "value": "\n".join(system)})  # before it, with the system's text
                system = []
            value = "" if content is None else _content(content, where, images, limits)
            speaker = "human" if role == "user" else "gpt"
            if speaker == "human" and system:
                value, system = "\n".join(system + [value]), []
            if turns and turns[-1]["from"] == speaker:
                turns[-1]["value"] += "\n" + value
            else:
                turns.append({"from": speaker, "value": value})
        else:
            raise bad(f"{where}: role {role!r} is not supported (system, developer, user, assistant)", f"{where}.role")
    if not turns and system:  # system messages alone (OpenAI answers them): the models read them as the question
        turns, system = [{"from": "human", "value": "\n".join(system)}], []
    if not turns or turns[-1]["from"] != "human":
        raise bad("the last message must be the user's: the model answers it", "messages")
    if system:  # after the last user message
        turns[-1]["value"] = "\n".join([turns[-1]["value"]] + system)
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or "text" not in modalities
                                   or not all(m in ("text", "image") for m in modalities)):
        raise bad(f"'modalities' is {modalities!r}: this model answers in text, with pictures "
                  "(['text', 'image']) or without (['text'])", "modalities", "unsupported_parameter")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("give 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    for s in stop or ():
        _unicode(s, "'stop'", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage", "include_obfuscation"}
                                or not all(isinstance(options.get(k), (bool, type(None)))
                                           for k in ("include_usage", "include_obfuscation"))):
        # bools, as OpenAI types them: a string "no" would have read as true. No obfuscation padding is
        # sent (OpenAI's default, true, pads chunks against a side channel of their sizes)
        raise bad("'stream_options' is {'include_usage': bool, 'include_obfuscation': bool}, and only with "
                  "'stream': true", "stream_options")
    return ChatCall(
        conversation=turns, images=images,
        max_tokens=_number(body, length_field, None, 1, integer=True),
        temperature=_number(body, "temperature", 0.0, 0, 2),  # greedy unless asked: the models answer best so
        # OpenAI takes 0 too: the most likely token alone (the sampler keeps the token that reaches p;
        # 2**-126 is float32's smallest normal number, which the top token's probability always reaches)
        top_p=_number(body, "top_p", 1.0, 0, 1) or 2.0 ** -126,
        top_k=_number(body, "top_k", 0, 0, 2 ** 31 - 1, integer=True),
        seed=_seed(body),
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        stop=stop or [], stream=stream, include_usage=bool((options or {}).get("include_usage")),
        guidance_scale=_number(body, "guidance_scale", 1.0, 0),
        allow_images=modalities is None or "image" in modalities, length_field=length_field)


def apply_stop(parts: list, stop: list[str]) -> tuple[list, bool]:
    """The answer cut before the first stop string (`first_stop`; everything after it dropped);
    whether one was found."""
    if not stop:
        return parts, False
    kept = []
    for part in parts:
        if isinstance(part, str) and (at := first_stop(part, stop)) is not None:
            return kept + ([part[:at]] if at else []), True
        kept.append(part)
    return kept, False


# --- images ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageCall:
    prompt: str
    n: int
    size: tuple[int, int]
    output_format: str
    guidance_scale: float
    negative_prompt: str | None
    seed: int | None


_IMAGE_FIELDS = {"model", "prompt", "n", "size", "response_format", "output_format", "guidance_scale",
                 "negative_prompt", "seed", "user", "safety_identifier"}
# output_compression 100 (OpenAI's default, the least compression) is what `picture_bytes` writes
# ("standard" is DALL-E 3's own default quality, which its clients send: the one this server draws)
_IMAGE_NEUTRAL = {"quality": (None, "auto", "standard"), "style": (None,), "background": (None, "auto", "opaque"),
                  "moderation": (None, "auto"), "output_compression": (None, 100), "stream": (None, False),
                  "partial_images": (None, 0), "input_fidelity": (None, "low")}


def parse_size(value: Any, default: tuple[int, int], sizes: tuple[tuple[int, int], ...] | None) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or 'WIDTHXHEIGHT', as the CLI's --size takes; 'auto': the server's default)
    -> (w, h). With `sizes` only those; the pipeline refuses sizes that are no multiple of 32 px or
    too long for the model."""
    if value is None or value == "auto":
        return default
    match = re.fullmatch(r"(\d{1,5})[xX](\d{1,5})", value.strip()) if isinstance(value, str) else None
    if match is None:
        raise bad(f"'size' must look like '{default[0]}x{default[1]}', got {value!r}", "size", "invalid_size")
    size = (int(match[1]), int(match[2]))
    if sizes is not None and size not in sizes:
        names = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise bad(f"size {value} is not one this model draws; it draws {names}", "size", "invalid_size")
    return size


def parse_images(body: dict, model_name: str, limits: Limits, *, default_size: tuple[int, int],
                 sizes: tuple[tuple[int, int], ...] | None, default_guidance: float) -> ImageCall:
    """An images generations request (or an edit's form fields, already numbers) -> an `ImageCall`.
    `guidance_scale` (classifier-free guidance, 1 = off), `negative_prompt` and `seed` are this
    server's own fields (the client's `extra_body`)."""
    check_model(body, model_name)
    _refuse_unknown(body, _IMAGE_FIELDS, _IMAGE_NEUTRAL, "images")
    _text(body, "user")
    if body.get("response_format") not in (None, "b64_json"):
        raise bad(f"response_format {body['response_format']!r}: this server returns pictures inline only "
                  "('b64_json')", "response_format", "unsupported_parameter")
    output_format = _text(body, "output_format", "png")
    if output_format not in PICTURE_FORMATS:
        raise bad(f"output_format {output_format!r}: one of {', '.join(PICTURE_FORMATS)}", "output_format")
    guidance, negative = _number(body, "guidance_scale", default_guidance, 0), _text(body, "negative_prompt")
    if negative is not None and guidance == 1:
        raise bad("negative_prompt acts only through guidance, and guidance_scale 1 is none: give another "
                  "guidance_scale or leave negative_prompt out", "negative_prompt")
    return ImageCall(prompt=_text(body, "prompt", required=True),
                     n=_number(body, "n", 1, 1, limits.max_n, integer=True),
                     size=parse_size(body.get("size"), default_size, sizes), output_format=output_format,
                     guidance_scale=guidance, negative_prompt=negative,
                     seed=_seed(body))


def form_fields(form: dict[str, str]) -> dict[str, Any]:
    """Multipart form values are strings; numbers become numbers and `stream` a bool (a bad one
    stays a string and is refused by `parse_images` with the field's name)."""
    out: dict[str, Any] = {}
    for name, value in form.items():
        if name == "stream" and value.strip().lower() in ("true", "false"):
            out[name] = value.strip().lower() == "true"
        elif name in ("n", "seed", "partial_images"):
            try:  # "2.0" as JSON's 2.0 is taken; "2.5" refused as no integer, as it is there
                out[name] = int(value) if re.fullmatch(r"-?\d+", value.strip()) else float(value)
            except ValueError:  # more digits than Python reads, or no number: left a string, refused by name
                out[name] = value
        elif name in ("guidance_scale", "output_compression"):
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = value
        else:
            out[name] = value
    return out


# --- responses ------------------------------------------------------------------------------------
def picture_bytes(picture: Image.Image, output_format: str = "png") -> bytes:
    """The picture in `output_format`, with the least compression (OpenAI's output_compression 100,
    its default): JPEG at quality 100 without chroma subsampling, WebP lossless (PIL's defaults were
    JPEG 75 and lossy WebP 80)."""
    buffer = io.BytesIO()
    options = {"jpeg": {"quality": 100, "subsampling": 0}, "webp": {"lossless": True}}.get(output_format, {})
    picture.save(buffer, format=PICTURE_FORMATS[output_format], **options)
    return buffer.getvalue()


def picture_part(picture: Image.Image) -> dict[str, Any]:
    data = base64.b64encode(picture_bytes(picture)).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def message_content(parts: list) -> str | list[dict[str, Any]]:
    """The answer's parts -> `message.content`: a string if all text, else the list of parts."""
    if all(isinstance(p, str) for p in parts):
        return "".join(parts)
    return [{"type": "text", "text": p} if isinstance(p, str) else picture_part(p) for p in parts]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(call_id: str, model: str, choices: list[tuple[list, str]], usage: dict) -> dict[str, Any]:
    """`choices`: (parts, finish_reason) of each."""
    return {"id": call_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": message_content(parts)},
                         "logprobs": None, "finish_reason": finish} for i, (parts, finish) in enumerate(choices)],
            "usage": usage}


def chat_chunk(call_id: str, model: str, created: int, index: int | None, delta: dict | None = None,
               finish_reason: str | None = None, usage: dict | None = None, *,
               include_usage: bool = False) -> dict[str, Any]:
    """One `chat.completion.chunk`; `index=None` gives the closing usage chunk (no choices). With
    `include_usage` (the call's `stream_options`) every chunk has a `usage` field, null but in the
    last, as OpenAI sends them."""
    chunk = {"id": call_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                                   "finish_reason": finish_reason}]}
    if usage is not None or include_usage:
        chunk["usage"] = usage
    return chunk


def chunk_deltas(parts: list) -> list[dict[str, Any]]:
    """The streamed deltas of an answer: text as strings, each picture a list of its one part."""
    return [{"content": p} if isinstance(p, str) else {"content": [picture_part(p)]} for p in parts]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def images_response(pictures: list[Image.Image], output_format: str, size: tuple[int, int]) -> dict[str, Any]:
    return {"created": int(time.time()), "output_format": output_format, "size": f"{size[0]}x{size[1]}",
            "data": [{"b64_json": base64.b64encode(picture_bytes(p, output_format)).decode("ascii")}
                     for p in pictures]}


def model_card(model_name: str, created: int) -> dict[str, Any]:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "unitoken"}
