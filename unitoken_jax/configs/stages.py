"""What the three training stages share; `configs/stage{1,2,3}.py` pick from it.

    python -m unitoken_jax.train --config configs/stage2.py:tiny --workdir /tmp/stage2
    python -m unitoken_jax.train --config configs/stage2.py --workdir /mnt/bucket/run \\
        --config.init_from.paths=/ckpt/UniToken-base-StageI --config.data.sources=/data/meta.yaml

Stage I trains the ViT and the adapter on captions (the decoder frozen); stage II trains
everything on understanding and generation 1:1; stage III (the paper's) fine-tunes everything on
instruction data. The full-size numbers follow the reference scripts (DESIGN.md section 2); the
`tiny` variants train a small model on a drawn demo dataset on a CPU in a minute or two.

Each stage file also defines `sweep(add, arg)` (big_vision's convention): see
`learning_rate_seed_sweep` and unitoken_jax/sweep.py.
"""

import ml_collections

from unitoken_jax.configs import model as model_configs

STAGES = {
    # trainable, learning rate, ViT lr scale, understanding : generation
    1: dict(trainable="vision", learning_rate=1e-3, vit_lr_scale=1e-2, mix=(1, 0)),
    2: dict(trainable="all", learning_rate=1e-5, vit_lr_scale=1.0, mix=(1, 1)),
    3: dict(trainable="all", learning_rate=5e-6, vit_lr_scale=1.0, mix=(1, 1)),
}


def stage_config(stage: int, arg: str = "") -> ml_collections.ConfigDict:
    tiny = arg == "tiny"
    if arg not in ("", "tiny", "anyres"):
        raise ValueError(f"unknown variant {arg!r}; use '' (7B), 'anyres' (7B AnyRes) or 'tiny'")
    s = STAGES[stage]
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.model_name = "tiny" if tiny else ("7b_anyres" if arg == "anyres" else "7b")
    c.model = model_configs.model_config(c.model_name)
    if not tiny:
        c.model.decoder.dropout = 0.05  # the reference's training recipe (its solver's --dropout)
    if tiny:
        c.model.decoder.vocab_size = 9216  # the small demo tokenizer's 9163 ids, rounded up
        c.model.decoder.max_position_embeddings = 1024

    c.init_from = ml_collections.ConfigDict(dict(
        # tiny runs start random, so each stands alone; chain them with
        # --config.init_from.kind=stage --config.init_from.paths=/tmp/stage1
        kind="random" if tiny else ("stage" if stage > 1 else "checkpoint"),
        # "checkpoint": HF or our Orbax directories, read in order, each overwriting the parts it has
        # (stage I: Lumina-mGPT's decoder, then SigLIP; the adapter starts random);
        # "stage": the previous stage's workdir (its exported final model).
        paths=(),
        seed=0,
    ))

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=s["learning_rate"], vit_lr_scale=s["vit_lr_scale"], warmup_fraction=0.01, b1=0.9, b2=0.95,
        weight_decay=0.1, grad_clip=4.0, accumulation_steps=1, trainable=s["trainable"]))
    # (with accumulation_steps=n, total_steps counts updates and the loop's other step counts -
    # log_every, checkpoint_every, stop_after, eval.every - count micro-batches: n an update)

    c.data = ml_collections.ConfigDict(dict(
        sources=(),  # pre-tokenized dataset dirs, or one YAML meta file (the reference's data config format)
        demo=tiny,  # build the drawn demo dataset in WORKDIR/demo_data (tiny runs)
        mix=s["mix"],
        rows=8 if tiny else 64,  # global batch rows (split over processes)
        # AnyRes: the reference spends 4,096 positions on a sample's discrete tokens and puts the
        # picture's SigLIP block (up to 3,700: tokenizer.anyres.max_block) on top
        # tiny: two ~142-token demo samples a row (256 held one: 55.6 % real at most; the log's bound)
        length=288 if tiny else (8192 if arg == "anyres" else 4096),
        # SigLIP tiles per global batch: a release-sized sample (1,024 codes + 729 features + text) is
        # ~1,900 positions with one tile, so 64 x 4,096 positions hold ~136 (benchmarks/packing.py)
        max_images=16 if tiny else (320 if arg == "anyres" else 192),  # AnyRes: 3 to 5 tiles a picture
        seed=0,
        num_threads=2 if tiny else 16,
        worker_count=0,
        lookahead=64,  # later groups a batch may choose from besides the oldest waiting one (fuller rows)
        new_order=False,  # resuming on changed data (or its order's settings): refused; True starts the order anew
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=0))  # 0: every device
    # evaluation during training (unitoken_jax/train/evaluate.py), off here: every > 0 turns it on, with
    # held-out data (a fraction of data.sources by sample id, or datasets of their own) and optionally
    # prompts to draw / (picture, question) pairs to answer, which need the data's tokenizers
    c.eval = ml_collections.ConfigDict(dict(
        every=0, sources=(), holdout_fraction=0.0, batches=2, seed=0, prompts=(), questions=(),
        tokenizer="", vqgan="", size=128 if tiny else 512, cfg=3.0, max_new_tokens=64, template=""))
    c.total_steps = 40 if tiny else (5000 if stage == 1 else 20000)
    c.log_every = 5 if tiny else 50
    c.checkpoint_every = 20 if tiny else 1000
    c.keep_checkpoints = 3
    c.stop_after = 0  # > 0: save and stop at this step (a time-boxed job; rerun to go on)
    # where the command line keeps the compiled step for the next start: "" = as the `unitoken` verbs
    # ($UNITOKEN_COMPILATION_CACHE, JAX's own setting, else ~/.cache/unitoken_jax/xla), a directory
    # (on a pod one every host sees, e.g. WORKDIR/xla, so a restarted job loads its step), or "off"
    c.compilation_cache = ""
    c.max_nonfinite_in_a_row = 10
    c.seed = 0
    c.log_sample_ids = True
    if tiny:
        c.optimizer.learning_rate = {1: 3e-3, 2: 3e-3, 3: 1e-3}[stage]
        c.optimizer.warmup_fraction = 0.1
    return c


def learning_rate_seed_sweep(add, stage: int, arg: str = "", factors=(0.5, 1.0, 2.0), seeds=(0, 1)) -> None:
    """A grid around the stage's own learning rate (the variant's: tiny runs use larger ones), times
    the data seed (the order of the batches). `add(**overrides)` once per run, keys dotted. The
    data seed is the one that matters everywhere: the tiny configs have no dropout (so `seed`
    changes nothing there) and stages II and III load every parameter (so `init_from.seed` changes
    nothing there)."""
    base = stage_config(stage, arg).optimizer.learning_rate
    for factor in factors:
        for seed in seeds:
            add(**{"optimizer.learning_rate": float(f"{base * factor:.3g}"), "data.seed": seed})
