"""Fine-tuning the release on one host (a v5e-8 / v6e-8 TPU VM, or one 8-GPU box):

    python -m unitoken_jax.train --config configs/finetune.py:lora --workdir /tmp/ft \\
        --config.init_from.paths=/ckpt/UniToken-7B --config.data.sources=/data/mine.yaml
    python -m unitoken_jax.train --config configs/finetune.py:tiny --workdir /tmp/ft_tiny   # a CPU, minutes

Variants:
- `lora` (default): low-rank adapters (rank 16, alpha 32) on every projection of the decoder; the
  base weights frozen in bfloat16, with no optimizer state (AdamW keeps moments for the adapters
  alone). The trained adapters are in WORKDIR/final (our format, the LoRA model) and
  WORKDIR/adapters (PEFT's format: `unitoken_jax.load(base, adapters=WORKDIR/adapters)`, or
  `peft.PeftModel.from_pretrained` on transformers' Chameleon).
- `full`: every weight trains, float32 master weights and AdamW moments (16 bytes a parameter:
  ~119 GB for 7.45 B parameters, more than one v5e-8 host holds; see the README's AOT table).
- `tiny`: LoRA on the tiny model and the drawn demo data (mechanics, on a CPU).

`init_from` takes a released HF directory or our Orbax checkpoint (a LoRA model there is merged
first). See `unitoken_jax.world.finetune_demo` for a LoRA run that teaches the bundled model French.
"""

import ml_collections

from unitoken_jax.configs import stages

VARIANTS = ("lora", "full", "tiny")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant = arg or "lora"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; use {', '.join(VARIANTS)} (default lora)")
    tiny = variant == "tiny"
    c = stages.stage_config(3, "tiny" if tiny else "")
    c.model_name = "tiny" if tiny else "7b"
    if variant in ("lora", "tiny"):
        c.model.lora = ml_collections.ConfigDict(dict(rank=8 if tiny else 16, alpha=16.0 if tiny else 32.0,
                                                      dropout=0.0 if tiny else 0.05, targets=LORA_TARGETS))
        c.model.decoder.dropout = 0.0  # the adapters' own dropout regularises
        c.model.param_dtype = "bfloat16"  # the frozen base: no float32 master copy needed
        c.optimizer.update(trainable="lora", learning_rate=3e-3 if tiny else 2e-4, weight_decay=0.0,
                           warmup_fraction=0.03)
    else:
        c.optimizer.update(trainable="all", learning_rate=1e-5, warmup_fraction=0.03)
    c.init_from.update(kind="random" if tiny else "checkpoint", paths=())
    if not tiny:  # one host: 8 chips, fsdp over them; one 4,096-position row per chip
        c.data.update(rows=8, length=4096, max_images=24)
        c.update(total_steps=2000, checkpoint_every=250, log_every=10)
        # held-out losses every 250 steps on 1 % of the data (by sample id, never trained on); add
        # --config.eval.prompts=... with eval.tokenizer / eval.vqgan to see pictures as it trains
        c.eval.update(every=250, holdout_fraction=0.01)
    return c


def sweep(add, arg: str = ""):
    """The learning rate at 0.5x, 1x and 2x the variant's own, times data seeds 0 and 1."""
    base = get_config(arg).optimizer.learning_rate
    for factor in (0.5, 1.0, 2.0):
        for seed in (0, 1):
            add(**{"optimizer.learning_rate": float(f"{base * factor:.3g}"), "data.seed": seed})
