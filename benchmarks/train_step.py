"""Training throughput: our packed, jitted train step against the reference's training step in
PyTorch, on the same small model (same weights), the same samples and this CPU, in one run.

The reference path is what the reference's solver does per step, written out with transformers'
Chameleon and SigLIP: the ViT runs once per sample, the adapter's features replace the continuous
positions of each sample's embeddings, every batch holds one data type (understanding or
generation) and is padded to its longest sample, then next-token cross-entropy + z-loss,
backward, global-norm clipping at 4 and AdamW (0.9, 0.95, weight decay 0.1). Ours packs the
same samples whole into fixed rows (understanding and generation mixed 1:1) and runs the pure
step of `unitoken_jax.train.step`. Tokens/s counts real tokens only (no padding).

Each side's speed is also given as a fraction of this machine's matmul peak, measured in the same
run (a large float32 matmul in XLA and in torch): the model FLOPs of the real tokens (the analytic
count of `train.metrics.FlopCounter`, with the LM head at every real token on both sides) per second,
over that peak. The two steps are
timed `--repeats` times, alternating; the table gives the median run of each.

The samples are the drawn demo items with answers of varied length (1 to 12 sentences), so
the batches' lengths vary as real data's do.

    python benchmarks/train_step.py [--steps 12] [--out benchmarks/results/train_step.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import ChameleonConfig, ChameleonForConditionalGeneration  # noqa: E402

import oracles  # noqa: E402
import unitoken_jax  # noqa: E402
from unitoken_jax.data import demo  # noqa: E402
from unitoken_jax.data import pretokenize as pt  # noqa: E402
from unitoken_jax.data.pipeline import InputPipeline, PipelineConfig  # noqa: E402
from unitoken_jax.configs import stages  # noqa: E402
from unitoken_jax.train.config import TrainConfig  # noqa: E402
from unitoken_jax.train.metrics import FlopCounter, predicting_positions  # noqa: E402
from unitoken_jax.train.optimizer import trainable_mask  # noqa: E402
from unitoken_jax.train.program import BATCH_KEYS, build_program, make_mesh  # noqa: E402
from unitoken_jax.train.state import create_state  # noqa: E402
from report import count, cpu_name, out_path, write_report  # noqa: E402

LR, Z_LOSS = 1e-4, 1e-5


def build_models(tmp, hidden, layers, vision_hidden):
    cfg = ChameleonConfig(vocab_size=9216, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                          num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          num_key_value_heads=hidden // 64, max_position_embeddings=2048,
                          model_parallel_size=hidden // 64, vocabulary_map={"<image>": 8711},
                          vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
                                         num_res_blocks=1, latent_channels=8, attn_resolutions=[], resolution=32),
                          attn_implementation="sdpa")
    torch.manual_seed(0)
    chameleon = ChameleonForConditionalGeneration(cfg)
    oracles.randomize_(chameleon, 0)
    siglip = oracles.make_siglip(hidden=vision_hidden, layers=2, heads=2, image_size=56, intermediate=4 * vision_hidden)
    adapter = oracles.make_adapter(vision_hidden, hidden)
    path = os.path.join(tmp, "hf")
    oracles.write_unitoken(path, chameleon, siglip, adapter, layout="transformers", z_loss_weight=Z_LOSS)
    return chameleon, siglip, adapter, path


def build_data(tmp, n_items):
    items_path = demo.write_demo_items(os.path.join(tmp, "items"), n_items, seed=0)
    items = json.load(open(items_path))
    rng = np.random.default_rng(0)
    for it in items:
        if it["conversations"][1]["value"] != "<|image|>":
            sentence = it["conversations"][1]["value"] + ". "
            it["conversations"][1]["value"] = sentence * int(rng.integers(1, 13))
    json.dump(items, open(items_path, "w"))
    text, vq = demo.demo_tokenizers()
    settings = pt.PretokenizeSettings(name="bench", vq_size=32, siglip_size=56, max_length=None, chunk_size=256)
    out = os.path.join(tmp, "data")
    pt.pretokenize(items_path, out, text, vq, settings, progress=False)
    return out


# --- the reference's step ----------------------------------------------------------------------
class ReferenceStep:
    def __init__(self, chameleon, siglip, adapter):
        self.chameleon, self.siglip, self.adapter = chameleon.train(), siglip.train(), adapter.train()
        params = [p for m in (chameleon, siglip, adapter) for p in m.parameters()]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)

    def __call__(self, samples):
        embed = self.chameleon.model.embed_tokens
        longest = max(len(s["tokens"]) for s in samples)
        rows, labels = [], []
        for s in samples:  # per sample, as the reference's forward
            e = embed(torch.from_numpy(s["tokens"].astype(np.int64)))
            if len(s["pixels"]):
                feats = self.adapter(self.siglip(torch.from_numpy(s["pixels"]).permute(0, 3, 1, 2)).last_hidden_state)
                feats = feats.reshape(-1, feats.shape[-1])
                cont = torch.from_numpy(s["is_continuous"])
                e = e.clone()
                e[cont] = feats[torch.from_numpy(s["feature_index"][s["is_continuous"]].astype(np.int64))]
            pad = longest - len(s["tokens"])
            rows.append(torch.cat([e, embed(torch.zeros(pad, dtype=torch.int64))]))
            labels.append(np.concatenate([s["labels"], np.full(pad, -100)]))
        x = torch.stack(rows)
        labels = torch.from_numpy(np.stack(labels).astype(np.int64))
        mask = (torch.arange(longest)[None] < torch.tensor([len(s["tokens"]) for s in samples])[:, None]).long()
        hidden = self.chameleon.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        logits = self.chameleon.lm_head(hidden)[:, :-1].float()
        target = labels[:, 1:]
        valid = target >= 0
        lse = torch.logsumexp(logits, -1)
        ce = lse - torch.gather(logits, -1, target.clamp(min=0)[..., None])[..., 0]
        loss = ce[valid].mean() + Z_LOSS * (lse[valid] ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 4.0)
        self.opt.step()
        return loss.item()


def matmul_peak(n: int = 2048, repeats: int = 10) -> tuple[float, float]:
    """(XLA, torch) float32 FLOP/s of an n x n x n matmul on this machine, best of `repeats`."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    f = jax.jit(lambda x, y: x @ y)
    x = jax.device_put(a)
    f(x, x).block_until_ready()
    ta = torch.from_numpy(a)
    torch.mm(ta, ta)
    best_x = best_t = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, x).block_until_ready()
        best_x = min(best_x, time.perf_counter() - t)
        t = time.perf_counter()
        torch.mm(ta, ta)
        best_t = min(best_t, time.perf_counter() - t)
    return 2 * n ** 3 / best_x, 2 * n ** 3 / best_t


def reference_batches(samples, batch, clustered=False):
    """One data type per batch, `batch` samples each (the reference's sampler; a half-filled batch
    is dropped). In stream order: what its sampler gives on a dataset within one of its shuffle
    windows (it sorts each type by length and shuffles within windows of 500 global batches, which
    here hold every sample). `clustered`: each type sorted by length and cut into batches of
    neighbours, what that sampler gives on a dataset many windows long (each window a narrow band
    of lengths), so that a batch pads little; the batches' order interleaved by a fixed shuffle."""
    if not clustered:
        out, open_ = [], {0: [], 1: []}
        for s in samples:
            open_[s["kind"]].append(s)
            if len(open_[s["kind"]]) == batch:
                out.append(open_[s["kind"]])
                open_[s["kind"]] = []
        return out
    out = []
    for kind in (0, 1):
        ordered = sorted((s for s in samples if s["kind"] == kind), key=lambda s: len(s["tokens"]))
        out += [ordered[i:i + batch] for i in range(0, len(ordered) - batch + 1, batch)]
    order = np.random.default_rng(0).permutation(len(out))
    return [out[i] for i in order]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=count(1), default=12,
                        help="timed steps of ours (the reference gets the same samples)")
    parser.add_argument("--hidden", type=count(1), default=256)
    parser.add_argument("--layers", type=count(1), default=4)
    parser.add_argument("--rows", type=count(1), default=8)
    parser.add_argument("--length", type=count(1), default=512)
    parser.add_argument("--max-images", type=count(1), default=32,
                        help="pictures a packed batch may hold (its pixel capacity), whatever its rows x length")
    parser.add_argument("--ref-batch", type=count(1), default=8)
    parser.add_argument("--repeats", type=count(1), default=3, help="timed runs of each side (the median is reported)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/train_step.md (another shape: its "
                                                    "trial/ folder)")
    args = parser.parse_args()
    args.out = out_path(parser, args, "train_step.md",
                        shape=("hidden", "layers", "rows", "length", "max_images", "ref_batch"))
    torch.set_num_threads(os.cpu_count())
    tmp = tempfile.mkdtemp()
    chameleon, siglip, adapter, path = build_models(tmp, args.hidden, args.layers, 64)
    data = build_data(tmp, 400)

    pipeline = InputPipeline([data], PipelineConfig(rows=args.rows, length=args.length, max_images=args.max_images,
                                                    num_threads=1))
    it = pipeline.iterator()
    batches = [next(it) for _ in range(args.steps + 2)]
    source, _, _ = pt.open_dataset(data)
    by_id = {}
    for i in range(len(source)):
        r = source[i]
        by_id[r["id"].decode()] = r

    # ours: the training program's step (what `unitoken_jax.train` runs), on one device, with the
    # layers scanned (the configs' default, what TPUs compile fast) and unrolled
    # (`model.scan_layers=False`, faster on a CPU)
    model = unitoken_jax.load(path, progress=False)
    timed = batches[2:]
    ours_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in timed)
    ours_padding = 1 - ours_tokens / sum(b["segment_ids"].size for b in timed)

    def ours_runner(scan_layers, loss_chunk=None):
        config = stages.stage_config(2, "tiny")
        config.model = model.config.to_dict()
        config.model.scan_layers = scan_layers
        if loss_chunk is not None:
            config.model.loss_chunk = loss_chunk
        config.data.rows, config.data.length, config.data.max_images = args.rows, args.length, args.max_images
        config.optimizer.learning_rate, config.optimizer.warmup_fraction = LR, 0.0
        config.total_steps, config.mesh.num_devices = 1000, 1
        config = TrainConfig.from_config_dict(config)
        program = build_program(config, make_mesh(config.mesh))
        params = jax.tree.map(lambda a: a.copy(), model.params)  # the step donates its state's buffers
        state = create_state(params, program.tx, program.state_shardings, config.seed)

        def run(bs):
            nonlocal state
            start = time.perf_counter()
            with program.context():
                for b in bs:
                    state, m = program.jitted(state, {k: b[k] for k in BATCH_KEYS})
                jax.block_until_ready(m["loss"])
            return time.perf_counter() - start

        run(batches[:2])  # compile + warm up
        return run

    # and unrolled with the LM head's loss in chunks of 256 positions instead of 512 (the same loss to
    # float rounding; its logits, 256 x 9216 floats, stay nearer the CPU's caches)
    ours = {"unrolled": ours_runner(False), "scanned": ours_runner(True),
            "unrolled, loss_chunk=256": ours_runner(False, 256)}

    # the reference, on the same samples (the timed batches' samples, in order)
    def sample(sid):
        r = by_id[sid]
        from unitoken_jax.tokenizer import images as image_io

        pixels = np.stack([image_io.siglip_pixels(image_io.to_rgb(image_io.load_image(bytes(b))), 56)
                           for b in r["image_bytes"]]) if len(r["image_bytes"]) else np.zeros((0, 56, 56, 3), np.float32)
        return dict(tokens=r["tokens"], labels=r["labels"], is_continuous=r["is_continuous"],
                    feature_index=r["feature_index"], pixels=pixels, kind=int(r["kind"]))

    warm = [sample(i) for b in batches[:2] for row in b["sample_ids"] for i in row]
    same = [sample(i) for b in timed for row in b["sample_ids"] for i in row]
    ref = ReferenceStep(chameleon, siglip, adapter)
    for b in reference_batches(warm, args.ref_batch)[:1]:
        ref(b)
    refs = {"stream order": reference_batches(same, args.ref_batch),
            "length-clustered": reference_batches(same, args.ref_batch, clustered=True)}

    def run_ref(ref_batches):
        start = time.perf_counter()
        for b in ref_batches:
            ref(b)
        return time.perf_counter() - start

    ours_runs, ref_runs = {k: [] for k in ours}, {k: [] for k in refs}
    for _ in range(args.repeats):
        for k, run in ours.items():
            ours_runs[k].append(run(timed))
        for k, ref_batches in refs.items():
            ref_runs[k].append(run_ref(ref_batches))
    ours_s = {k: float(np.median(v)) for k, v in ours_runs.items()}
    ref_s = {k: float(np.median(v)) for k, v in ref_runs.items()}
    ref_tokens = {k: sum(len(s["tokens"]) for b in bs for s in b) for k, bs in refs.items()}
    ref_slots = {k: sum(len(b) * max(len(s["tokens"]) for s in b) for b in bs) for k, bs in refs.items()}

    # model FLOPs of the real tokens each side trained on (the same count on both sides: the head at
    # every real token, which the reference runs; the training log counts it where a token is predicted)
    counter = FlopCounter(model.config, model.params, trainable_mask(model.params, "all"))
    features = 16  # 56 px tiles, 14 px patches
    ours_flops = sum(counter.per_step(int((b["segment_ids"] > 0).sum()),
                                      float(b["positions"][b["segment_ids"] > 0].mean() + 1),
                                      features * sum(1 for k in b["kinds"] if k == "understanding")) for b in timed)
    ref_flops = {k: sum(counter.per_step(sum(len(s["tokens"]) for s in b),
                                         sum(len(s["tokens"]) * (len(s["tokens"]) + 1) / 2 for s in b)
                                         / sum(len(s["tokens"]) for s in b),
                                         features * sum(len(s["pixels"]) for s in b)) for b in bs)
                 for k, bs in refs.items()}
    # the count's share that is the input embedding table (6 FLOPs a weight and token, though a
    # lookup multiplies nothing): what an MFU without it (PaLM's, MaxText's) leaves out
    embedding = 6 * model.config.decoder.vocab_size * model.config.decoder.hidden_size * ours_tokens / ours_flops
    # the head's work ours skips: the LM head (D x V, trained: 6 FLOPs a weight and token) on real
    # positions that predict nothing (the next token is unlabelled or of another sample)
    head_weights = model.config.decoder.hidden_size * model.config.decoder.vocab_size
    ours_predicting = sum(predicting_positions(b) for b in timed)
    ours_done = ours_flops - 6 * head_weights * (ours_tokens - ours_predicting)
    peak_xla, peak_torch = matmul_peak()
    ref_tps = {k: ref_tokens[k] / ref_s[k] for k in refs}
    ours_tps = {k: ours_tokens / v for k, v in ours_s.items()}
    n_params = model.num_params()
    date = datetime.date.today().isoformat()
    lines = [
        "# Training throughput: ours vs the reference's step (PyTorch)", "",
        f"{date}, {cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}, "
        f"jax {jax.__version__}, torch {torch.__version__}, float32.", "",
        f"Model: decoder {args.layers} layers x {args.hidden} hidden, vocab 9216; SigLIP-style tower 2 x 64 at 56 px; "
        f"{n_params / 1e6:.1f} M parameters, same weights on both sides.",
        f"Data: {len(same)} demo samples (understanding answers of 1-12 sentences, generation of 8x8-code pictures).", "",
        f"Matmul peak measured in this run (float32, 2048^3, best of 10): XLA {peak_xla / 1e9:.0f} GFLOP/s, "
        f"torch {peak_torch / 1e9:.0f} GFLOP/s.", "",
        "| | batches | real tokens | padding | seconds (median of "
        f"{args.repeats}) | real tokens / s | model GFLOP/s | of its matmul peak |", "|---|---|---|---|---|---|---|---|",
        *(f"| reference, {k} (per-sample ViT, one type per batch of {args.ref_batch}, padded to the longest) | "
          f"{len(bs)} | {ref_tokens[k]} | {1 - ref_tokens[k] / ref_slots[k]:.0%} | {ref_s[k]:.2f} | "
          f"{ref_tps[k]:.0f} | {ref_flops[k] / ref_s[k] / 1e9:.1f} | {ref_flops[k] / ref_s[k] / peak_torch:.0%} |"
          for k, bs in refs.items()),
        *(f"| ours, layers {k} (packed {args.rows} x {args.length} rows, 1:1 mixed, one jitted step) | {len(timed)} | "
          f"{ours_tokens} | {ours_padding:.0%} | {ours_s[k]:.2f} | {ours_tps[k]:.0f} | "
          f"{ours_flops / ours_s[k] / 1e9:.1f} | {ours_flops / ours_s[k] / peak_xla:.0%} |" for k in ours), "",
        *(f"**Ours, layers {k} / reference, {r}: {ours_tps[k] / ref_tps[r]:.2f}x real tokens per second** (median "
          f"runs; each run's ratio: "
          f"{', '.join(f'{t / o * ours_tokens / ref_tokens[r]:.2f}' for o, t in zip(ours_runs[k], ref_runs[r]))})."
          for r in refs for k in ours), "",
        "The reference's sampler (`length_clustering`, its default) sorts each data type by length and shuffles "
        "within windows of 500 global batches: on these samples, all in one window, its batches are the stream "
        "order's; on a dataset many windows long each window is a narrow band of lengths, and its batches are "
        "nearer the length-clustered ones (neighbours in length: the least padding it reaches). Ours packs the same "
        "samples either way.", "",
        "Layers unrolled is `--config.model.scan_layers=False`: the train state keeps the scanned layout (checkpoints, "
        "shardings and Adam's moments are the same), the step unrolls it inside. Scanned is the configs' default, "
        "which a TPU compiles in a fraction of the time for the 7B's 32 layers. `loss_chunk=256` is "
        "`--config.model.loss_chunk=256`: the fused LM head and loss run over 256 predicting positions at a time "
        "instead of the default 512 (the TPU configs' AOT figures are made at 512).", "",
        "The reference drops the samples left in a half-filled batch at the end; both count only the tokens they "
        "trained on. The model GFLOP/s column counts the same analytic FLOPs on both sides, with the LM head on every "
        "real token (the reference runs it there); ours runs the head only where a token is predicted (each device's "
        "predicting positions gathered into chunks, `models.loss.fused_lm_loss`): "
        f"{ours_predicting} of its {ours_tokens} real positions, so the FLOPs it ran are about "
        f"{ours_done / ours_flops:.0%} of its count ({ours_done / ours_s['unrolled'] / 1e9:.1f} GFLOP/s unrolled, "
        f"{ours_done / ours_s['unrolled'] / peak_xla:.0%} of its peak; the training log's MFU counts so). "
        "The count includes "
        f"the input embedding table, whose lookup multiplies nothing: {embedding:.0%} of it at this small width "
        "(about 4 % at the 7B's); an MFU without it (PaLM's and MaxText's convention) is that much lower on both "
        "sides. CPU timings show the ratio on this machine, "
        "not accelerator speed: the two "
        "libraries' matmul peaks (measured above) differ from one CPU to another, and at this small width "
        "attention is a large share of the step, where XLA's blocked attention (batched dots and an online "
        "softmax, forward and backward) is slower than torch's fused `scaled_dot_product_attention` kernel.",
    ]
    write_report(lines + [""], args.out)


if __name__ == "__main__":
    main()
