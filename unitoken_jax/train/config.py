"""The typed training configuration: what `train_and_evaluate` and the training program read.

Users write and override ml_collections ConfigDicts (unitoken_jax/configs/stages.py, the
`--config.x=y` flags, sweeps); `TrainConfig.from_config_dict` turns one into these frozen
dataclasses once, at start-up, so that a misspelt key (`optimizer.learning_rat`) or a value of
the wrong type (`data.rows='8'`) is an error naming the key before anything is built, and the
rest of the code reads typed fields. The field names are the ConfigDict's keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unitoken_jax.models.config import UniTokenConfig, from_mapping
from unitoken_jax.train.optimizer import OptimizerConfig

INIT_KINDS = ("random", "checkpoint", "stage")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the stage's parameters start. "checkpoint": HF or our Orbax directories, read in order,
    each overwriting the parts it has; "stage": a previous stage's workdir (its `final/` model)."""

    kind: str = "random"
    paths: tuple[str, ...] = ()
    seed: int = 0

    def validate(self) -> "InitConfig":
        if self.kind not in INIT_KINDS:
            raise ValueError(f"init_from.kind={self.kind!r}; choose one of {', '.join(INIT_KINDS)}")
        if self.kind == "random" and self.paths:
            raise ValueError("init_from.kind is 'random' but init_from.paths is set; use kind 'checkpoint' or 'stage'")
        return self  # paths for 'checkpoint' / 'stage' are checked when the stage starts: the full-size
        # configs leave them for the command line to fill


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The input pipeline (unitoken_jax.data.pipeline); `rows` and `max_images` are global."""

    sources: tuple[str, ...] = ()  # pre-tokenized dataset dirs, or one YAML meta file
    demo: bool = False  # build the drawn demo dataset in WORKDIR/demo_data
    mix: tuple[int, int] = (1, 1)  # understanding : generation samples in every batch
    rows: int = 8
    length: int = 256
    max_images: int = 8  # SigLIP tiles per global batch
    seed: int = 0
    num_threads: int = 2
    worker_count: int = 0
    lookahead: int = 64  # later groups a batch may choose from besides the oldest waiting one (0: strictly in order)
    # a resume on data whose order differs from the checkpoint's (datasets, counts, ratios, mix, seed,
    # holdout): refused, or with True the order starts anew on this data (the model and optimizer go on)
    new_order: bool = False

    def validate(self) -> "DataConfig":
        for name in ("rows", "length", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        if min(self.mix) < 0 or sum(self.mix) < 1:
            raise ValueError(f"data.mix={self.mix} needs non-negative parts, not both 0")
        for name in ("lookahead", "worker_count", "num_threads"):  # (-1 workers read as 0, then locked the resume)
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be 0 or more, got {getattr(self, name)}")
        if any(not str(s).strip() for s in self.sources):
            raise ValueError(f"data.sources={self.sources!r} holds an empty path (`--config.data.sources=` gives "
                             "one): give dataset directories or a YAML meta file, comma-separated, or leave it out")
        return self


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (train/evaluate.py): every `every` steps, the loss on held-out
    data split into understanding and generation, and a fixed set of prompts decoded with the
    compiled loop (pictures and answers to TensorBoard, pictures to WORKDIR/samples/step_N.png).

    The held-out data is either datasets of its own (`sources`) or a fraction of the training
    data chosen by sample id (`holdout_fraction`), which training then never reads. The fraction
    decides what training reads whether or not `every` is set, so turning evaluation on or off
    later does not change the batches."""

    every: int = 0  # steps between evaluations; 0: no evaluation
    sources: tuple[str, ...] = ()  # held-out pre-tokenized dataset dirs (or a YAML meta file) of their own
    holdout_fraction: float = 0.0  # or: this fraction of data.sources' samples, by sample id, is held out
    batches: int = 2  # held-out batches (the training batch's shape), the same ones at every evaluation
    seed: int = 0  # which held-out samples fill those batches; the seed of the drawn pictures
    prompts: tuple[str, ...] = ()  # text-to-image prompts drawn at every evaluation
    questions: tuple[tuple[str, str], ...] = ()  # (picture path or "", question) answered at every evaluation
    tokenizer: str = ""  # the data's text tokenizer (tokenizer.json) for prompts and questions; "demo": the demo's
    vqgan: str = ""  # the data's VQ-GAN (as `unitoken generate --vqgan`); "demo": the demo's
    size: int = 512  # side of the drawn pictures, in the layout's pixels (a multiple of 32)
    cfg: float = 3.0  # classifier-free guidance of the drawn pictures (1: none)
    max_new_tokens: int = 64  # the longest answer
    # the prompts' drawing template ({prompt}, and {w} {h} if it names the size); "": the reference's,
    # `inference.pipeline.GENERATE_TEMPLATE` (the shapes world's is `world.shapes.GENERATE_TEMPLATE`)
    template: str = ""

    def validate(self) -> "EvalConfig":
        for name in ("every", "holdout_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be 0 (off) or more, got {getattr(self, name)}")
        if self.holdout_fraction >= 1:
            raise ValueError(f"eval.holdout_fraction={self.holdout_fraction} would leave nothing to train on; "
                             "give a fraction in [0, 1), or keep held-out datasets in eval.sources")
        if self.sources and self.holdout_fraction:
            raise ValueError("eval.sources and eval.holdout_fraction are both set: evaluation reads one held-out "
                             "set; give one of them")
        if self.every and not (self.sources or self.holdout_fraction):
            raise ValueError(f"eval.every={self.every} needs held-out data: set eval.holdout_fraction (a fraction of "
                             "data.sources, by sample id) or eval.sources (datasets of their own)")
        for name in ("batches", "size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be at least 1, got {getattr(self, name)}")
        if self.size % 32:
            raise ValueError(f"eval.size={self.size} must be a multiple of 32 (the layout's grid unit)")
        if self.cfg <= 0:
            raise ValueError(f"eval.cfg={self.cfg} must be positive (1: no guidance)")
        for name in ("prompts", "questions"):
            if getattr(self, name) and not (self.tokenizer and self.vqgan):
                raise ValueError(f"eval.{name} needs eval.tokenizer and eval.vqgan (the tokenizers the data was "
                                 "pre-tokenized with; 'demo' and 'demo' for the demo data)")
        if (self.tokenizer == "demo") != (self.vqgan == "demo"):
            raise ValueError("eval.tokenizer='demo' and eval.vqgan='demo' go together (the demo's small tokenizers)")
        if self.template:
            from unitoken_jax.inference.pipeline import check_template

            try:
                check_template(self.template)
            except ValueError as e:
                raise ValueError(f"eval.template: {e}") from None
        for i, (_, question) in enumerate(self.questions):
            if not question.strip():
                raise ValueError(f"eval.questions[{i}] has an empty question")
        return self

    @property
    def decodes(self) -> bool:
        return bool(self.prompts or self.questions)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (the rest of the devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    num_devices: int = 0  # 0: every device; n: the first n

    def validate(self) -> "MeshConfig":
        if self.num_devices < 0:
            raise ValueError(f"mesh.num_devices={self.num_devices} must be 0 (every device) or the number to use")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: int
    model: UniTokenConfig
    init_from: InitConfig
    optimizer: OptimizerConfig
    data: DataConfig
    mesh: MeshConfig
    total_steps: int
    model_name: str = ""
    # checkpointing
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    stop_after: int = 0  # > 0: save and stop at this step (a time-boxed job; rerun to go on)
    # logging
    log_every: int = 50
    log_sample_ids: bool = True  # WORKDIR/samples.jsonl
    # the run
    max_nonfinite_in_a_row: int = 10
    seed: int = 0  # dropout
    # the command line's compilation cache ("" = the `unitoken` verbs' default, a directory, "off"),
    # turned on by `python -m unitoken_jax.train` before anything compiles: a global JAX setting
    compilation_cache: str = ""
    # evaluation during training (a config without the key evaluates nothing)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    @classmethod
    def from_config_dict(cls, config: Any) -> "TrainConfig":
        """From a ConfigDict (or a plain nested mapping) with the keys of configs/stages.py."""
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        optimizer = values.get("optimizer")
        if isinstance(optimizer, dict) and "total_steps" in optimizer:
            raise ValueError("optimizer.total_steps is not a key: the schedule spans the config's total_steps")
        if isinstance(optimizer, dict) and "total_steps" in values:
            values["optimizer"] = {**optimizer, "total_steps": values["total_steps"]}
        return from_mapping(cls, values, "config").validate()

    def validate(self) -> "TrainConfig":
        self.init_from.validate()
        self.optimizer.validate()
        self.data.validate()
        self.eval.validate()
        self.mesh.validate()
        self.model.validate()
        if self.model.quantize != "none":
            raise ValueError(f"model.quantize={self.model.quantize!r}: quantized weights are for inference only; "
                             "training supports quantize='none' (the supported inference modes are 'none', 'int8')")
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage={self.stage}; the stages are 1, 2 and 3")
        for name in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_in_a_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stop_after < 0:
            raise ValueError(f"stop_after={self.stop_after}: give a step to save and stop at (> 0), or 0 for none")
        if self.optimizer.total_steps != self.total_steps:
            raise ValueError(f"optimizer.total_steps={self.optimizer.total_steps} differs from total_steps="
                             f"{self.total_steps}")
        return self

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        """The ConfigDict-shaped dict (what WORKDIR/config.json records)."""
        d = dataclasses.asdict(self)
        del d["optimizer"]["total_steps"]
        return d
