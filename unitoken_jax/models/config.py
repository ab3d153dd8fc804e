"""Typed, hashable model configuration.

The ml_collections files under `configs/` are what people edit and sweep; they are turned into
these frozen dataclasses before a Flax module sees them, so that a typo in a field name fails at
once and the modules can take the config as a (hashable) attribute.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")  # names, as configs and checkpoints write them
QUANTIZE_MODES = ("none", "int8")
ATTENTION_BACKENDS = ("auto", "splash", "cudnn", "xla")
# LoRA targets: the decoder's projections by their transformers names (what PEFT's target_modules
# say for Chameleon), the LM head, and two groups: the adapter's two layers and every projection of
# the SigLIP tower.
DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = DECODER_LORA_TARGETS + ("lm_head", "adapter", "vision")


def check_quantize(mode: str) -> str:
    """`mode` if it is a supported weight format, else a ValueError naming the supported ones."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r} is not supported; the supported modes are "
                         f"{', '.join(repr(m) for m in QUANTIZE_MODES)}")
    return mode


def _at_least_1(part: str, config, names) -> None:
    """A ValueError naming `part.name` where a size is not a whole number of at least 1 (0 heads or
    patches had been a ZeroDivisionError's traceback, 0 layers a model that trained as nothing)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{part}.{name}={value!r} must be a whole number of at least 1")


def _in_range(part: str, config, name: str, ok, what: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{part}.{name}={value!r} must be {what}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The Chameleon decoder (the released 7B numbers are the defaults)."""

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-5
    # Rows of each QK-norm weight/bias: transformers' checkpoints store one row per head, the
    # Lumina-mGPT / UniToken ones one row per model-parallel shard (repeat-interleaved over the
    # heads at run time). None means one row per head.
    qk_norm_groups: int | None = None
    swin_norm: bool = False
    dropout: float = 0.0
    # The q/k/v kernels' order: [heads, embed, head_dim] (False: checkpoints, and what TPU's dots
    # want) or [embed, heads, head_dim] (True: a plain matrix for a CPU's dots, which otherwise copy
    # every kernel into that order at every step). Only `DecodeLoop`'s own unrolled copy of the
    # weights on a CPU uses True (`models.unitoken.cpu_decode_params`); checkpoints never do.
    qkv_embed_first: bool = False
    # Decoding with a stacked (scanned) KV cache: 0 reads every slot at each step; N reads the
    # cache N slots at a time and only the blocks below the furthest slot any row has reached
    # (`layers.attend_filled`). Set by `DecodeLoop` for its own steps; checkpoints never do.
    cache_block: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _at_least_1("decoder", self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                      "num_kv_heads", "max_position_embeddings"))
        # (a rope_theta of 0 or less made every position NaN: every step skipped, the run "finished")
        for name, ok, what in (("rope_theta", lambda v: 0 < v < math.inf, "a positive number"),
                               ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
                               ("rms_norm_eps", lambda v: 0 < v < math.inf, "a positive number"),
                               ("qk_norm_eps", lambda v: 0 < v < math.inf, "a positive number")):
            _in_range("decoder", self, name, ok, what)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        groups = self.qk_norm_groups
        if groups is not None and (self.num_heads % groups or self.num_kv_heads % groups):
            raise ValueError(
                f"qk_norm_groups {groups} must divide num_heads {self.num_heads} and num_kv_heads {self.num_kv_heads}"
            )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision tower (so400m/14 @ 384 by default); the pooling head is not modelled."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2

    def features_per_image(self, hw: tuple[int, int] | None = None) -> int:
        """Continuous tokens of one image of `hw` pixels (default: the tower's own size)."""
        h, w = hw or (self.image_size, self.image_size)
        return (h // self.patch_size) * (w // self.patch_size)

    def validate(self) -> None:
        _at_least_1("vision", self, ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size",
                                     "image_size", "num_channels"))
        _in_range("vision", self, "layer_norm_eps", lambda v: 0 < v < math.inf, "a positive number")
        if self.image_size < self.patch_size:
            raise ValueError(f"vision.image_size={self.image_size} is smaller than one patch ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters beside frozen kernels: `kernel @ x + (alpha / rank) * B(A(dropout(x)))`,
    A [in, rank] (PEFT's default init, uniform +-1/sqrt(in)), B [rank, out] (zeros, so a new adapter
    changes nothing). Dropout acts in training only (when the step passes a dropout rng)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DECODER_LORA_TARGETS

    def __post_init__(self):  # "q_proj,v_proj" (a command line's one string) names two targets
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(t.strip() for entry in targets for t in entry.split(",")
                                                  if t.strip()))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoraConfig":
        if self.rank < 1:
            raise ValueError(f"lora.rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"lora.targets is empty; name some of {', '.join(LORA_TARGETS)}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown lora target(s) {', '.join(map(repr, unknown))}; the targets are "
                             f"{', '.join(LORA_TARGETS)}")
        return self

    def targets_path(self, path: tuple[str, ...]) -> bool:
        """Does a kernel at module path `path` (e.g. ('decoder', 'layers', 'self_attn', 'q_proj'))
        get an adapter?"""
        if not path:
            return False
        if path[0] == "decoder":
            return path[-1] in self.targets and path[-1] != "adapter"
        if path[0] == "adapter":
            return "adapter" in self.targets
        if path[0] == "vit":
            return "vision" in self.targets
        return False


@dataclasses.dataclass(frozen=True)
class UniTokenConfig:
    """A whole model: decoder, optional vision tower + adapter, and the numeric policy.

    `decoder` or `vision` may be None for a checkpoint that holds only the other one; the adapter
    exists exactly when both do.
    """

    decoder: DecoderConfig | None = dataclasses.field(default_factory=DecoderConfig)
    vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
    z_loss_weight: float = 1e-5
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # Weight format for inference: "none" (param_dtype everywhere) or "int8" (every matmul kernel
    # int8 with a float32 scale per output channel; see `unitoken_jax.models.quantize`).
    quantize: str = "none"
    # Training / prefill attention (`unitoken_jax.models.attention`): "auto" (splash on TPU v4 and
    # later, cudnn on Ampere and later GPUs in 16-bit, xla elsewhere), "splash", "cudnn" or "xla";
    # its query / key block.
    attention: str = "auto"
    attention_block: int = 128
    # Training: positions of each device's rows the LM head and the loss take at once
    # (`models.loss.fused_lm_loss`)
    loss_chunk: int = 512
    # Low-rank adapters (fine-tuning; `unitoken_jax.models.lora`), None for none
    lora: LoraConfig | None = None

    @property
    def has_adapter(self) -> bool:
        return self.decoder is not None and self.vision is not None

    def validate(self) -> "UniTokenConfig":
        if self.decoder is None and self.vision is None:
            raise ValueError("a model needs a decoder, a vision tower or both")
        if self.decoder is not None:
            self.decoder.validate()
        if self.vision is not None:
            self.vision.validate()
        # (a negative weight rewards large logits: the loss fell below 0 and the run trained on)
        _in_range("model", self, "z_loss_weight", lambda v: 0 <= v < math.inf, "0 or more")
        for name in ("dtype", "param_dtype"):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in FLOAT_DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype the model runs in; choose one of "
                                 f"{', '.join(FLOAT_DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
        check_quantize(self.quantize)
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} is not a backend; choose one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.attention_block < 1:
            raise ValueError(f"attention_block must be at least 1, got {self.attention_block}")
        if self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be at least 1, got {self.loss_chunk}")
        if self.lora is not None:
            self.lora.validate()
        return self

    def replace(self, **changes: Any) -> "UniTokenConfig":
        """This config with `changes` (top-level fields), checked."""
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts of the fields (what `from_dict` and the checkpoints' JSON take)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "model") -> "UniTokenConfig":
        """Builds a config from a plain mapping or a `ml_collections.ConfigDict`; unknown keys and
        values of the wrong type are errors naming the key (`where` prefixes it)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        sub = {}
        for name, sub_cls in (("decoder", DecoderConfig), ("vision", VisionConfig)):
            value = d.pop(name, None)
            sub[name] = None if value is None else from_mapping(sub_cls, value, f"{where}.{name}")
        return from_mapping(cls, {**d, **sub}, where).validate()


def from_mapping(cls, values: Mapping[str, Any], where: str):
    """A frozen dataclass `cls` from a mapping (or a ConfigDict), checked against its annotations:
    an unknown key or a value of the wrong type is a `ValueError` that names the dotted key.
    Nested dataclass fields are built the same way; ints are accepted for floats, lists for
    tuples, and a single string for a tuple of strings."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; {where} has "
                         f"{', '.join(sorted(known))}")
    return cls(**{k: _typed(hints[k], v, f"{where}.{k}") for k, v in values.items()})


def _typed(kind, value, where: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(option, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}={value!r} fits none of {kind}")
    if dataclasses.is_dataclass(kind):
        if dataclasses.is_dataclass(value) and isinstance(value, kind):
            return value
        if not hasattr(value, "keys"):
            raise ValueError(f"{where} must be a mapping of {kind.__name__} fields, got {value!r}")
        return kind.from_dict(value, where) if hasattr(kind, "from_dict") else from_mapping(kind, value, where)
    if origin is tuple:
        if isinstance(value, str) and args[-1] is Ellipsis and args[0] is str:
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{where} must be a tuple, got {type(value).__name__} {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} must have {len(args)} entries, got {len(value)}: {value!r}")
        return tuple(_typed(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if kind is typing.Any:
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    raise ValueError(f"{where} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r}")
