"""The optimizer of the reference's training stages, in optax.

AdamW (beta 0.9 / 0.95, weight decay on every trainable parameter, as torch's AdamW in the
reference), a learning-rate scale for the ViT, frozen parameters with no optimizer state,
linear warm-up then half-cosine to 0, global-norm clipping, and gradient accumulation.

Which parameters train is a label per leaf: "train", "vit" (trained with lr * vit_lr_scale) or
"frozen". As in the reference, the ViT's patch and position embeddings are always frozen. With
`trainable="lora"` only the low-rank adapters train (`unitoken_jax.models.lora`): every base
weight is frozen, so Adam keeps moments for the adapters alone; those on the ViT (`lora.targets`
"vision") are "vit", at lr * vit_lr_scale like the tower's own weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from unitoken_jax.models.lora import is_adapter

# stage II/III: everything; stage I: ViT + adapter (decoder frozen); fine-tuning: the LoRA adapters only
TRAINABLE = ("all", "vision", "lora")
_ALWAYS_FROZEN = (("vit", "patch_embedding"), ("vit", "position_embedding"))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    vit_lr_scale: float = 1.0
    total_steps: int = 1000
    warmup_fraction: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 4.0
    accumulation_steps: int = 1
    trainable: str = "all"

    def validate(self) -> "OptimizerConfig":
        if self.trainable not in TRAINABLE:
            raise ValueError(f"optimizer.trainable={self.trainable!r}; choose one of {TRAINABLE}")
        for name in ("total_steps", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{'' if name == 'total_steps' else 'optimizer.'}{name} must be at least 1, got "
                                 f"{getattr(self, name)}")
        # a value outside its range would train, wrongly and quietly: a negative rate climbs the loss, a
        # clip of 0 zeroes every update, b2 = 1 never updates Adam's second moment (NaN fails every test)
        for name, ok, what in (("learning_rate", lambda v: 0 < v < math.inf, "positive"),
                               ("vit_lr_scale", lambda v: 0 <= v < math.inf, "0 or more"),
                               ("warmup_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
                               ("b1", lambda v: 0 <= v < 1, "in [0, 1)"), ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
                               ("weight_decay", lambda v: 0 <= v < math.inf, "0 or more"),
                               ("grad_clip", lambda v: 0 < v <= math.inf, "positive (inf: no clipping)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"optimizer.{name}={value!r} must be {what}")
        return self


def param_labels(params, trainable: str = "all"):
    """A tree of "train" / "vit" / "frozen" labels shaped like `params`."""
    def label(path, _):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        if trainable == "lora":  # the tower's adapters (lora.targets "vision") learn at the ViT's rate
            return "frozen" if not is_adapter(keys) else "vit" if keys[0] == "vit" else "train"
        if any(keys[:len(f)] == f for f in _ALWAYS_FROZEN):
            return "frozen"
        if keys[0] == "vit":
            return "vit"
        if trainable == "vision" and keys[0] != "adapter":
            return "frozen"
        return "train"

    return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_fraction` of the steps, then half a cosine down to 0
    (a fraction that rounds to no step: no warm-up, the full rate at step 0)."""
    warmup = int(round(config.total_steps * config.warmup_fraction))
    if warmup == 0:  # (optax's warm-up schedule logs that a 0-step warm-up is constant)
        return optax.cosine_decay_schedule(config.learning_rate, max(config.total_steps, 1), alpha=0.0)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(config.total_steps, warmup + 1),
                                              end_value=0.0)


def make_optimizer(config: OptimizerConfig, params) -> optax.GradientTransformation:
    config.validate()
    schedule = learning_rate_schedule(config)

    def adamw(scale):
        return optax.adamw(lambda step: schedule(step) * scale, b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay)

    labels = param_labels(params, config.trainable)
    if config.accumulation_steps == 1:
        return optax.chain(
            optax.clip_by_global_norm(config.grad_clip),
            optax.multi_transform({"train": adamw(1.0), "vit": adamw(config.vit_lr_scale),
                                   "frozen": optax.set_to_zero()}, labels))
    # Accumulation wraps the trainable leaves alone: `optax.MultiSteps` keeps a float32 running mean
    # of every gradient it is given, which around the whole chain was a copy of the frozen base too
    # (28 GiB for the 7B LoRA config at accumulation_steps=4, against 0.3 GiB of adapter moments).
    # Frozen gradients are zero (`stop_gradient`), so clipping the trainable ones alone is the same.
    update = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.multi_transform({"train": adamw(1.0), "vit": adamw(config.vit_lr_scale)},
                              lambda trainable: param_labels(trainable, config.trainable)))
    return optax.multi_transform(
        {"trainable": optax.MultiSteps(update, every_k_schedule=config.accumulation_steps),
         "frozen": optax.set_to_zero()},
        jax.tree.map(lambda label: "frozen" if label == "frozen" else "trainable", labels))


def accumulation_state(opt_state) -> optax.MultiStepsState:
    """The `optax.MultiSteps` state inside the optimizer state `make_optimizer` made with
    accumulation (its running mean covers the trainable leaves)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
             if isinstance(s, optax.MultiStepsState)]
    if len(found) != 1:
        raise ValueError("the optimizer state holds no gradient accumulation (optimizer.accumulation_steps=1)")
    return found[0]


def trainable_mask(params, trainable: str = "all"):
    """True for the leaves that receive gradients."""
    return jax.tree.map(lambda l: l != "frozen", param_labels(params, trainable))
