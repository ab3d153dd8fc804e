"""Seconds per 512 x 512 image (batch 1) and images per second (batch 8): ours against the
reference's generation algorithm in PyTorch, on the same random weights, in one run.

The reference path is transformers' Chameleon `generate` (sampling) with the reference's three
logits processors, written out here: classifier-free guidance that runs a second, unbatched
forward with its own KV cache inside the processor; the grid constraint (grid tokens forced,
codes only inside a row, newline at row end, <eoss> after the last row); and top-k chosen by
image/text. Its `generate_img` batches the pictures of one prompt (`num_return_sequences`: the
guidance runs every row's unconditional context, the grid constraint counts on row 0, which every
row of one prompt keeps in step with); it takes one prompt a call, so 8 prompts are 8 runs.

The two sides are timed in turn, `--rounds` times (ours at batch 1, ours at the batch, the
reference's image), and each ratio is the medians' with the range of the rounds' own beside it.

    python benchmarks/decode.py [--layers 8 --hidden 512 --grid 16 --rounds 3] [--out benchmarks/results/decode.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, LogitsProcessor  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

import unitoken_jax  # noqa: E402
from unitoken_jax.inference import decode as decode_lib, grid as grid_ids  # noqa: E402
from unitoken_jax.inference.decode import DecodeLoop, Request, prefill_width  # noqa: E402
from unitoken_jax.tokenizer import layout  # noqa: E402
from report import count, cpu_name, out_path, weight_bytes_per_step, write_report  # noqa: E402

CFG, TOP_K = 3.0, 2000


class ReferenceCFG(LogitsProcessor):
    """Guidance with a second forward of the unconditional context (every row's), cache of its own."""

    def __init__(self, model, scale):
        self.model, self.scale = model, scale
        self.cache, self.fed = None, 0

    def __call__(self, input_ids, scores):
        ids = input_ids[0]
        starts = (ids == layout.IMAGE_START).nonzero()
        if not len(starts) or len(ids) - int(starts[-1]) < 3:
            return scores
        uncond = input_ids[:, int(starts[-1]):]
        new = uncond[:, self.fed:]
        out = self.model(input_ids=new, past_key_values=self.cache, use_cache=True)
        self.cache, self.fed = out.past_key_values, uncond.shape[1]
        u = out.logits[:, -1].float()
        return self.scale * (scores - u) + u


class ReferenceGrid(LogitsProcessor):
    def __init__(self, grid):
        self.grid, self.w = grid, 2 * grid

    def __call__(self, input_ids, scores):
        ids = input_ids[0].tolist()
        start = len(ids) - 1 - ids[::-1].index(layout.IMAGE_START)
        after = ids[start + 1:]
        forced = None
        if len(after) < 2:
            forced = layout.GRID_BASE + self.grid
        else:
            body = len(after) - 2
            if (body + 1) % (self.w + 1) == 0:
                forced = layout.NEWLINE
            elif body + 1 == (self.w + 1) * 2 * self.grid + 1:
                forced = layout.IMAGE_END
        if forced is not None:
            mask = torch.full_like(scores, -float("inf"))
            mask[:, forced] = 0
            return scores + mask
        mask = torch.full_like(scores, -float("inf"))
        mask[:, 4:8196] = 0
        return scores + mask


class ReferenceTopK(LogitsProcessor):
    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        kth = torch.topk(scores, self.k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, -float("inf"))


def reference_images(model, prompt, grid, seed, n=1):
    """`n` pictures of one prompt in one `generate` (the reference's `num_return_sequences`)."""
    torch.manual_seed(seed)
    n_new = 2 + 2 * grid * (2 * grid + 1) + 1
    processors = LogitsProcessorList([ReferenceCFG(model, CFG), ReferenceGrid(grid), ReferenceTopK(TOP_K)])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True,
                             temperature=1.0, top_k=0, logits_processor=processors, eos_token_id=None, pad_token_id=0,
                             num_return_sequences=n)
    return out[:, len(prompt):].tolist()


def reference_image(model, prompt, grid, seed):
    return reference_images(model, prompt, grid, seed)[0]


def reference_split(model, prompt, grid) -> dict[str, float]:
    """Seconds a generated token of the reference's algorithm spends in its decoder layers, its LM
    head (all 65,536 columns), the rest of its model's forwards (embeddings, final norm, the HF
    wrapper) and the rest of the step (`generate`, the processors, sampling), and in all: one more
    image, every forward of the model and its modules timed by a wrapper (the conditional and the
    CFG processor's unconditional ones alike)."""
    spent = {"layers": 0.0, "head": 0.0, "forward": 0.0}
    wrapped = [(model, "forward"), (model.lm_head, "head"), *((layer, "layers") for layer in model.model.layers)]

    def timing(fn, part):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start
        return run

    for module, part in wrapped:
        module.forward = timing(module.forward, part)
    try:
        start = time.perf_counter()
        tokens = reference_image(model, prompt, grid, 0)
        total = time.perf_counter() - start
    finally:
        for module, _ in wrapped:
            del module.forward  # the instance attribute: the class's forward again
    n = len(tokens)
    return {"decoder layers": spent["layers"] / n, "LM head": spent["head"] / n,
            "rest of the forwards": (spent["forward"] - spent["layers"] - spent["head"]) / n,
            "`generate`, processors, sampling": (total - spent["forward"]) / n, "a token in all": total / n}


GROWTH = (128, 64)  # the finer cache growths measured beside the default


def model_only_step_seconds(loop: DecodeLoop, prompt, rows: int, steps: int, timed_steps: int | None = None,
                            chunk: int = 64, read: dict | None = None) -> float:
    """Seconds a step of the same forward the decode loop runs (one token a row through the
    cached decoder, then the code logits), in compiled loops, with no sampling, no grid and no
    guidance: what a decode step costs at least. The steps run in the segments over which
    `loop.generate` keeps one cache length (its cache grows between chunks where the layers are
    unrolled), each from a cache of that length; only the loops are timed. `read`, if given, gets
    "cache": the KV cache bytes a step reads (every slot of every layer's buffers: the unrolled
    loop's attention reads them all), averaged over the timed steps."""
    from unitoken_jax.inference import grid
    from unitoken_jax.models.unitoken import UniToken

    # the prefill's batch as `loop.generate` builds it (the prompt padded to its multiple)
    _, batch, _, _, cache_len = loop._prepare([Request(np.array(prompt), max_new_tokens=steps)] * rows)
    length = batch[0].shape[1]
    capacities = loop._capacities(length, steps, chunk, cache_len)  # as `loop.generate` grows its cache
    steps = timed_steps or steps
    segments = []  # (first step, end step, cache length)
    for end, capacity in zip(range(chunk, steps + chunk, chunk), capacities):
        end = min(end, steps)
        if segments and segments[-1][2] == capacity:
            segments[-1] = (segments[-1][0], end, capacity)
        else:
            segments.append((segments[-1][1] if segments else 0, end, capacity))

    def run(params, cache, first, end):
        def body(i, carry):
            cache, acc = carry
            tok = jnp.full((rows, 1), 100, jnp.int32)
            positions = jnp.full((rows, 1), len(prompt), jnp.int32) + i
            hidden, cache = loop._apply(params, tok, positions, jnp.ones((rows, 1), jnp.int32), cache=cache,
                                        return_hidden=True)
            logits = loop._apply(params, hidden, grid.CODE_LOGITS, method=UniToken.head)
            return cache, acc + jnp.max(logits)  # every logit is used, as sampling would

        return jax.lax.fori_loop(first, end, body, (cache, jnp.float32(0)))[1]

    run = jax.jit(run, static_argnums=(2, 3))
    seconds, cache_bytes = 0.0, 0.0
    for first, end, capacity in segments:
        _, cache = loop._prefill(loop.params, *batch, capacity)
        cache_bytes += (end - first) * sum(x.nbytes for x in jax.tree.leaves((cache["k"], cache["v"])))
        jax.block_until_ready(run(loop.params, cache, first, end))  # compile
        start = time.perf_counter()
        jax.block_until_ready(run(loop.params, cache, first, end))
        seconds += time.perf_counter() - start
    if read is not None:
        read["cache"] = cache_bytes / steps
    return seconds / steps


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """This machine's memory read bandwidth as XLA reaches it, bytes per second: the best of
    `repeats` sums of a float32 array of `megabytes` (far larger than any cache)."""
    x = jnp.ones((megabytes << 18,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(total(x))
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def watch_cache_sizes(loop: DecodeLoop) -> set:
    """The cache lengths `loop.generate` runs from now on (its prefill's and each growth's), as a
    set that fills as it runs."""
    ran, prefill, grow = set(), loop._prefill, loop._grow
    loop.__dict__["_prefill"] = lambda *args: ran.add(args[-1]) or prefill(*args)
    loop.__dict__["_grow"] = lambda cache, capacity: ran.add(capacity) or grow(cache, capacity)
    return ran


def chameleon_config(layers: int, hidden: int) -> ChameleonConfig:
    """The benchmark model: Chameleon-shaped, 64-wide heads, the release's vocabulary of 65,536."""
    return ChameleonConfig(vocab_size=65536, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                           num_hidden_layers=layers, num_attention_heads=hidden // 64,
                           num_key_value_heads=hidden // 64, max_position_embeddings=4096,
                           vocabulary_map={"<image>": 8711}, attn_implementation="sdpa",
                           vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
                                          num_res_blocks=1, latent_channels=8, attn_resolutions=[], resolution=32))


def model_arguments(name: str, rounds: bool = True):
    """The command line of the CPU decode benchmarks, read: the model's shape, the picture, the
    batch (and `rounds` of the timings against the reference, where the benchmark has them); the
    results to benchmarks/results/NAME, or to its trial folder for another shape (`report.out_path`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=count(1), default=8)
    parser.add_argument("--hidden", type=count(1), default=512)
    parser.add_argument("--grid", type=count(1), default=16, help="grid units a side: 16 = 512 px, 32 x 32 codes")
    parser.add_argument("--batch", type=count(1), default=8)
    if rounds:
        parser.add_argument("--rounds", type=count(1), default=3,
                            help="rounds of ours at batch 1, ours at the batch and the reference's image, in turn")
    parser.add_argument("--out", default=None, help=f"default: benchmarks/results/{name} (another shape: its trial/)")
    args = parser.parse_args()
    args.out = out_path(parser, args, name, shape=("layers", "hidden", "grid", "batch"))
    return args


def main():
    args = model_arguments("decode.md")
    torch.set_num_threads(os.cpu_count())
    cfg = chameleon_config(args.layers, args.hidden)
    torch.manual_seed(0)
    reference = ChameleonForConditionalGeneration(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = unitoken_jax.load(tmp, progress=False)
    prompt = [0] + list(range(9000, 9020)) + [layout.END_OF_TURN, layout.IMAGE_START]
    n_tokens = 2 + 2 * args.grid * (2 * args.grid + 1) + 1
    loop = DecodeLoop(ours.config, ours.params)

    def request(seed, words=prompt):
        return Request(np.array(words), max_new_tokens=n_tokens, grid_hw=(args.grid, args.grid), cfg_scale=CFG,
                       image_top_k=TOP_K, image_temperature=1.0, stop_after_image=True, seed=seed)

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    # a batch of different prompts (of one length, so the work is the batch of one prompt's)
    prompts = [[0] + list(range(9000 + i, 9020 + i)) + [layout.END_OF_TURN, layout.IMAGE_START]
               for i in range(args.batch)]

    def pictures(rows):
        return all(len(r) == n_tokens and layout.parse_image_ids([layout.IMAGE_START] + r).code_ids.shape
                   == (2 * args.grid, 2 * args.grid) for r in rows)

    def in_turn(decode_loop, ref_model):
        """`args.rounds` rounds of (ours at batch 1, ours at the batch of one prompt, ours at the
        batch of as many prompts, the reference's image, the reference's batch of one prompt): this
        machine's own speed drifts by a quarter within a day, so each side is timed beside the other
        and each round's ratios are its own. Returns the five lists of seconds."""
        times = ([], [], [], [], [])
        for _ in range(args.rounds):
            t1, toks = timed(lambda: decode_loop.generate([request(1)]))
            assert len(toks.tokens[0]) == n_tokens
            tb, _ = timed(lambda: decode_loop.generate([request(i) for i in range(args.batch)]))
            tp, toks = timed(lambda: decode_loop.generate([request(i, words) for i, words in enumerate(prompts)]))
            assert pictures([t.tolist() for t in toks.tokens])
            tr, ref_toks = timed(lambda: reference_image(ref_model, prompt, args.grid, 0))
            trb, ref_rows = timed(lambda: reference_images(ref_model, prompt, args.grid, 0, args.batch))
            assert pictures([ref_toks]) and pictures(ref_rows) and len(ref_rows) == args.batch
            for kept, t in zip(times, (t1, tb, tp, tr, trb)):
                kept.append(t)
        return times

    def speedups(times):
        """The medians' ratios (batch 1: the reference's seconds over ours; at the batch: our images a
        second over the reference's, for one prompt against its batch, for as many prompts against as
        many runs of it) and the range of each round's own."""
        t1, tb, tp, tr, trb = (np.asarray(t) for t in times)
        med = [float(np.median(t)) for t in (t1, tb, tp, tr, trb)]
        pairs = ((tr / t1, med[3] / med[0]), (trb / tb, med[4] / med[1]), (args.batch * tr / tp,
                                                                           args.batch * med[3] / med[2]))
        return [f"{ratio:.1f}x (rounds {each.min():.1f}-{each.max():.1f}x)" for each, ratio in pairs]

    ran_default = watch_cache_sizes(loop)
    loop.generate([request(0)])  # compile batch 1
    first_b, _ = timed(lambda: loop.generate([request(i) for i in range(args.batch)]))  # compile batch 8
    f32_times = in_turn(loop, reference)
    ours_1, ours_b, ours_p, ref_1, ref_b = (float(np.median(t)) for t in f32_times)
    f32_speedups = speedups(f32_times)
    ref_split = reference_split(reference, prompt, args.grid)  # one more image, its parts timed
    # the cache grown GROWTH slots at a time (`DecodeLoop(cache_growth=...)`): fewer unfilled slots
    # read a step, more compiles (what the first call of a fresh loop shows)
    by_growth = {}

    def doubling(prompt, max_new, chunk, full=None):  # the cache's lengths until 2026-12-01
        full = prompt + max_new if full is None else full
        return [min(full, max(256, 1 << (prompt + min(e, max_new) - 1).bit_length()))
                for e in range(chunk, max_new + chunk, chunk)]

    def listed(lengths):
        return ", ".join(str(c) for c in sorted(set(lengths)))

    def sizes(capacities):
        return listed(capacities(prefill_width(len(prompt), loop.prompt_multiple), n_tokens, 64))

    default_growth_sizes = sizes(loop._capacities)
    assert listed(ran_default) == default_growth_sizes, (sorted(ran_default), default_growth_sizes)
    for label, cache_growth in [(f"doubling: {sizes(doubling)}", "doubling"),
                                *((f"{g} slots at a time", g) for g in GROWTH)]:
        # a fresh loop compiles its own programs: loops of one config share them in a process
        # (`decode._steps`), and jax's caches hold the compiled ones (until 2026-12-05 a variant's first
        # call reused the default loop's prefill and its loop at the full cache: understated)
        decode_lib._steps.cache_clear()
        jax.clear_caches()
        stepped = DecodeLoop(ours.config, ours.params,
                             cache_growth=None if cache_growth == "doubling" else cache_growth)
        if cache_growth == "doubling":
            stepped.__dict__["_capacities"] = doubling
        ran = watch_cache_sizes(stepped)
        first_g, out_g = timed(lambda: stepped.generate([request(i) for i in range(args.batch)]))
        # the sizes this variant's loop really ran are the ones it was given (on 2026-12-02 one machine
        # timed the doubling variant equal to the default to every digit)
        assert listed(ran) == sizes(stepped._capacities), (sorted(ran), label)
        runs_g = [timed(lambda: stepped.generate([request(i) for i in range(args.batch)])) for _ in range(3)]
        assert all((a == b).all() for _, o in runs_g for a, b in zip(o.tokens, out_g.tokens))
        by_growth[label] = first_g, float(np.median([t for t, _ in runs_g]))
    read_1, read_b = {}, {}
    model_1 = model_only_step_seconds(loop, prompt, 2, n_tokens, read=read_1)
    model_b = model_only_step_seconds(loop, prompt, 2 * args.batch, n_tokens, read=read_b)
    # the memory floor of a model-only step: the bytes it must read (weights once, the whole KV
    # cache) at the read bandwidth XLA reaches on this machine, measured here
    weights = weight_bytes_per_step(ours.params, grid_ids.CODE_LOGITS)
    bandwidth = read_bandwidth()
    # the weight formats for inference: bfloat16 and int8, both computing in bfloat16 (on a CPU the
    # weight products accumulate in float32 and attention runs in float32 from a float32 cache:
    # `models.layers.attention_dtype`, `benchmarks/cpu_dots.py`), model-only steps over the same
    # cache lengths as the float32 one above, and a whole batch in bfloat16
    by_format = {}
    for name in ("bfloat16", "int8"):
        model = unitoken_jax.UniTokenModel(ours.config.replace(param_dtype="bfloat16", dtype="bfloat16"),
                                           jax.tree.map(lambda a: a.astype(jnp.bfloat16), ours.params))
        if name == "int8":
            model = model.quantize("int8")
        # both unrolled, as `auto` ran both until it began to scan int8 weights on a CPU (where unrolled
        # layers convert all their kernels at once): the formats alone differ
        fmt_loop = DecodeLoop(model.config, model.params, layers="unrolled")
        by_format[name] = [model_only_step_seconds(fmt_loop, prompt, rows, n_tokens) for rows in (2, 2 * args.batch)]
        if name == "bfloat16":
            fmt_loop.generate([request(0)])  # compile batch 1
            fmt_loop.generate([request(i) for i in range(args.batch)])  # compile batch 8
            # against the reference's algorithm on the same weights in bfloat16 (torch computes its
            # bfloat16 products with this CPU's bfloat16 instructions where it has them), in turn
            bf16_times = in_turn(fmt_loop, reference.to(torch.bfloat16))  # (the float32 runs are done)
            bf16_1, bf16_b, bf16_p, ref_bf16, ref_bf16_b = (float(np.median(t)) for t in bf16_times)
            bf16_speedups = speedups(bf16_times)

    lines = [
        f"# Decoding speed: one {32 * args.grid} x {32 * args.grid} image (CFG 3, top-k 2000), ours vs the "
        "reference's algorithm", "",
        f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, "
        f"torch {torch.__version__}. Model: Chameleon-shaped, {args.layers} layers, hidden {args.hidden}, "
        f"vocab 65,536, random weights (the same in both); {2 * args.grid}x{2 * args.grid} codes = "
        f"{n_tokens} generated tokens per image.", "",
        "| | ours (JAX) | reference algorithm (PyTorch) | ours faster by |", "|---|---|---|---|",
        f"| seconds per image, batch 1 | {ours_1:.3g} | {ref_1:.3g} | {f32_speedups[0]} |",
        f"| images per second, batch {args.batch}, one prompt | {args.batch / ours_b:.3f} | "
        f"{args.batch / ref_b:.3f} (one batch: `num_return_sequences`) | {f32_speedups[1]} |",
        f"| images per second, batch {args.batch}, {args.batch} prompts | {args.batch / ours_p:.3f} | "
        f"{1 / ref_1:.3f} (a prompt a call: {args.batch} runs) | {f32_speedups[2]} |", "",
        "Ours: cond and uncond rows in one batch, one compiled loop (`unitoken_jax.inference.decode`). "
        "Reference: transformers `generate` with a CFG processor that runs its own second forward each step, "
        "the grid processor and top-k (see `benchmarks/decode.py`); its `generate_img` batches the pictures of "
        "one prompt (`num_return_sequences`) and takes one prompt a call. Compile time is excluded (measured after a "
        f"warm-up run of each batch size). Each side is the median of {args.rounds} runs, timed in turn: "
        f"{args.rounds} rounds of ours at batch 1, ours at batch {args.batch} (one prompt, then {args.batch}), "
        f"the reference's image and its batch of {args.batch}, "
        "because this machine's own speed moves by up to a quarter within a day; beside each ratio, the range "
        "of the rounds' own ratios.", "",
        "Where the reference's step goes (float32, one more image, every forward of its model and modules "
        "timed by a wrapper; its two one-row forwards a step, the conditional and the CFG processor's), ms a "
        "generated token:", "",
        "| " + " | ".join(ref_split) + " |", "|" + "---|" * len(ref_split),
        "| " + " | ".join(f"{1e3 * v:.2f}" for v in ref_split.values()) + " |", "",
        "How close a step is to the model: a whole generation (prefill included) divided by its steps, against "
        "the same cached forward and code head in compiled loops with no sampling, grid or guidance, over the "
        "same cache lengths (on this CPU the loop's cache grows between chunks, by default to "
        f"{default_growth_sizes} slots).", "",
        "Growing the cache a fixed number of slots at a time (`DecodeLoop(cache_growth=N)`, "
        "`UniTokenPipeline(..., cache_growth=N)`) instead of the default (as many sizes as doubling from 256 "
        "would take, evenly spaced), or doubling (what the default was until 2026-12-01): a step reads fewer "
        "slots no row has reached with finer growth, at the price of more compiles on a fresh loop's first call "
        f"(batch {args.batch}, the same tokens either way; later calls of the same shapes compile nothing):", "",
        f"| cache grows | first call, s (compiles included) | images per second, batch {args.batch} | "
        "vs the reference's batch of one prompt |", "|---|---|---|---|",
        f"| default: {default_growth_sizes} | {first_b:.1f} | {args.batch / ours_b:.3f} | "
        f"{ref_b / ours_b:.1f}x |",
        *(f"| {label} | {first_g:.1f} | {args.batch / ours_g:.3f} | "
          f"{ref_b / ours_g:.1f}x |" for label, (first_g, ours_g) in by_growth.items()), "",
        "| rows (images x 2 for CFG) | full step, ms | model-only step, ms | full / model |", "|---|---|---|---|",
        f"| 2 (batch 1) | {1e3 * ours_1 / n_tokens:.1f} | {1e3 * model_1:.1f} | {ours_1 / n_tokens / model_1:.2f} |",
        f"| {2 * args.batch} (batch {args.batch}) | {1e3 * ours_b / n_tokens:.1f} | {1e3 * model_b:.1f} | "
        f"{ours_b / n_tokens / model_b:.2f} |", "",
        "The memory floor of a model-only step (float32 weights and cache; a model small enough for the CPU's "
        "caches can beat it): the bytes it reads — every "
        f"weight once ({weights / 2**20:.3g} MiB: the layers, the final norm and the head's code columns) "
        f"and every slot of the KV cache, averaged over the cache lengths above — at this machine's "
        f"read bandwidth as XLA reaches it ({bandwidth / 1e9:.1f} GB/s, the best sum of a 512 MiB array):", "",
        "| rows | model-only step, ms | read a step, MiB (weights + KV cache) | floor at that bandwidth, ms | "
        "floor / step |", "|---|---|---|---|---|",
        *(f"| {rows} | {1e3 * step:.3g} | {(weights + read['cache']) / 2**20:.3g} ({weights / 2**20:.3g} + "
          f"{read['cache'] / 2**20:.3g}) | {1e3 * (weights + read['cache']) / bandwidth:.3g} | "
          f"{(weights + read['cache']) / bandwidth / step:.2f} |"
          for rows, step, read in ((2, model_1, read_1), (2 * args.batch, model_b, read_b))), "",
        f"20x the reference's images per second at batch {args.batch} (its batch of one prompt) would take a "
        f"whole step (prefill included) of {1e3 * ref_b / 20 / n_tokens:.1f} ms.", "",
        "Weight formats: the model-only step over the same cache lengths, computing in bfloat16 with the "
        "weights in bfloat16 or in int8 with a scale per output channel. On a CPU the weight products of 16-bit "
        "operands accumulate in float32 and round once, and attention runs in float32 from a float32 cache "
        "(XLA's CPU dots of bfloat16 operands took 0.4-1.05x the float32 time when they write float32, "
        "1.1-3.4x when they write bfloat16; `benchmarks/cpu_dots.py`). On an accelerator int8 halves the "
        "weight bytes each step reads; on this CPU the int8 values are converted to bfloat16 inside the step:", "",
        "| rows | float32, ms | bfloat16, ms | int8 weights, ms | bfloat16 / float32 | int8 / bfloat16 |",
        "|---|---|---|---|---|---|",
        *(f"| {rows} | {1e3 * f32:.1f} | {1e3 * by_format['bfloat16'][i]:.1f} | {1e3 * by_format['int8'][i]:.1f} | "
          f"{by_format['bfloat16'][i] / f32:.2f} | {by_format['int8'][i] / by_format['bfloat16'][i]:.2f} |"
          for i, (rows, f32) in enumerate(((2, model_1), (2 * args.batch, model_b)))), "",
        "Whole generations in bfloat16 (weights and compute), against the reference's algorithm on the same "
        f"weights in bfloat16, in {args.rounds} rounds as above (medians; the rounds' own ratios in parentheses):", "",
        "| | ours, bfloat16 | reference algorithm, bfloat16 | ours faster by | bfloat16 over float32, ours | "
        "bfloat16 over float32, reference |", "|---|---|---|---|---|---|",
        f"| bfloat16: seconds per image, batch 1 | {bf16_1:.3g} | {ref_bf16:.3g} | {bf16_speedups[0]} | "
        f"{ours_1 / bf16_1:.2f}x | {ref_1 / ref_bf16:.2f}x |",
        f"| bfloat16: images per second, batch {args.batch}, one prompt | {args.batch / bf16_b:.3f} | "
        f"{args.batch / ref_bf16_b:.3f} (one batch) | {bf16_speedups[1]} | {ours_b / bf16_b:.2f}x | "
        f"{ref_b / ref_bf16_b:.2f}x |",
        f"| bfloat16: images per second, batch {args.batch}, {args.batch} prompts | {args.batch / bf16_p:.3f} | "
        f"{1 / ref_bf16:.3f} ({args.batch} runs) | {bf16_speedups[2]} | {ours_p / bf16_p:.2f}x | "
        f"{ref_1 / ref_bf16:.2f}x |", "",
        ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
