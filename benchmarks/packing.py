"""How full the packed rows are at the stage configs' shape (64 rows x 4,096 positions), with
strictly in-order packing (`data.lookahead=0`) and with the look-ahead the configs use.

Three datasets, pre-tokenized by the project's own `pretokenize`:
- the demo data as the training loop builds it (`data.demo=True`) for the 7B configs: 8 x 8 VQ
  codes and the model's 384 px SigLIP tile (729 features) a picture;
- the drawn demo items at the release's image sizes (1,024 VQ codes from a 32 x 32 grid, 729
  SigLIP features from a 384 px tile), answers of 1 to 12 sentences;
- the shapes world's training items (its own tokenizer and VQ-GAN, the bundled model's), as
  `world/build.py` makes them.

For each, the pixel capacity (`data.max_images`) is the stage configs' (192 tiles; 64 before
2026-11-30) and one sized for the data (enough tiles that tokens, not pictures, close a batch).
A real token is a position inside a sample (segment id > 0). With the look-ahead, also packed in
32 blocks (`--blocks`), as training on the 32-chip v5p slice packs them: each chip's 2 rows take
their pictures from its own 1/32 of the tiles (see `data.packing.RowPacker`).

    python benchmarks/packing.py [--batches 6] [--out benchmarks/results/packing.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from unitoken_jax.data import demo  # noqa: E402
from unitoken_jax.data import pretokenize as pt  # noqa: E402
from unitoken_jax.data.pipeline import InputPipeline, PipelineConfig  # noqa: E402
from unitoken_jax.tokenizer.text import TextTokenizer  # noqa: E402
from unitoken_jax.vq_tokenizer import VQTokenizer  # noqa: E402
from unitoken_jax.world import shapes  # noqa: E402
from unitoken_jax.world.default import DEFAULT_DIR  # noqa: E402
from report import count, cpu_name, out_path, write_report  # noqa: E402

ROWS, LENGTH = 64, 4096


def demo_release_sized(tmp: str, n: int) -> str:
    items_path = demo.write_demo_items(os.path.join(tmp, "demo_items"), n, seed=0)
    items = json.load(open(items_path))
    rng = np.random.default_rng(0)
    for it in items:
        answer = it["conversations"][1]
        if answer["value"] != "<|image|>":
            answer["value"] = " ".join([answer["value"] + "."] * int(rng.integers(1, 13)))
    json.dump(items, open(items_path, "w"))
    text, vq = demo.demo_tokenizers()  # the demo VQ-GAN downsamples 4x: a 128 px crop is 32 x 32 codes
    settings = pt.PretokenizeSettings(name="demo", vq_size=128, siglip_size=384, patch=14, max_length=None,
                                      chunk_size=256, vq_batch=32)
    out = os.path.join(tmp, "demo")
    pt.pretokenize(items_path, out, text, vq, settings, progress=False)
    return out


def demo_as_the_configs_build_it(tmp: str, n: int) -> str:
    """`data.demo=True` with the 7B configs: 8 x 8 codes, the model's 384 px SigLIP tile."""
    return demo.build_demo_dataset(os.path.join(tmp, "demo_7b"), n, siglip_size=384, vq_size=32)


def shapes_world(tmp: str, n: int) -> str:
    items = shapes.write_items(os.path.join(tmp, "shapes_items"), n, seed=0)
    settings = pt.PretokenizeSettings(name="shapes", vq_size=shapes.VQ_SIZE, siglip_size=shapes.SIGLIP_SIZE,
                                      patch=shapes.PATCH, max_length=None, chunk_size=1024, vq_batch=256)
    out = os.path.join(tmp, "shapes")
    vq = VQTokenizer.from_dir(os.path.join(DEFAULT_DIR, "vqgan"))
    pt.pretokenize(items, out, TextTokenizer(shapes.tokenizer_json()), vq, settings, progress=False)
    return out


def measure(data: str, tiles: int, lookahead: int, batches: int, blocks: int = 1) -> tuple[float, ...]:
    """(mean real fraction, its minimum, samples per batch) over `batches` batches, and the seconds a
    batch after the first (which opens the streams; None where there is no other)."""
    config = PipelineConfig(rows=ROWS, length=LENGTH, max_images=tiles, num_threads=2, lookahead=lookahead,
                            blocks=blocks)
    it = InputPipeline([data], config).iterator()
    fractions, samples, done = [], [], []
    for _ in range(batches):
        b = next(it)
        done.append(time.perf_counter())
        fractions.append(float((b["segment_ids"] > 0).mean()))
        samples.append(len(b["kinds"]))
    seconds = (done[-1] - done[0]) / (batches - 1) if batches > 1 else None  # (one batch: none timed)
    return float(np.mean(fractions)), float(np.min(fractions)), float(np.mean(samples)), seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=count(1), default=6)
    parser.add_argument("--lookahead", type=count(0), default=64, help="the configs' data.lookahead")
    parser.add_argument("--wide", type=count(0), default=256, help="a wider look-ahead also measured (largest budget)")
    parser.add_argument("--blocks", type=count(1), default=32, help="data-parallel shards (chips) of a batch")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/packing.md (other settings: its "
                                                    "trial/ folder)")
    args = parser.parse_args()
    args.out = out_path(parser, args, "packing.md", shape=("batches", "lookahead", "wide", "blocks"))
    tmp = tempfile.mkdtemp()
    datasets = [("demo data as `data.demo=True` builds it for the 7B configs (64 codes + 729 features a picture)",
                 demo_as_the_configs_build_it(tmp, 600), (64, 192, 384)),
                ("demo items, release image sizes (1,024 codes + 729 features a picture), answers of 1-12 sentences",
                 demo_release_sized(tmp, 600), (64, 192)),
                ("shapes world (16 codes + 16 features a picture, 3 questions an item)",
                 shapes_world(tmp, 3000), (192, 4096))]
    rows = []
    for name, path, budgets in datasets:
        for tiles in budgets:
            fill, _ = InputPipeline([path], PipelineConfig(rows=ROWS, length=LENGTH, max_images=tiles)).fill_bound(
                records=10**9)
            settings = [(0, 1), (args.lookahead, 1), (args.lookahead, args.blocks)]
            if tiles == budgets[-1] and args.wide > args.lookahead:
                settings.append((args.wide, 1))
            for lookahead, blocks in settings:
                mean, low, per_batch, seconds = measure(path, tiles, lookahead, args.batches, blocks)
                rows.append(f"| {name} | {fill.mean:.0f} | {tiles} | {lookahead} | {blocks} | "
                            f"{per_batch:.0f} | **{mean:.1%}** | {low:.1%} | {fill.bound:.1%} ({fill.per_row} a row) | "
                            f"{'not timed (one batch)' if seconds is None else f'{seconds:.2f}'} |")
                print(rows[-1], flush=True)
    lines = [
        "# Packing: real tokens in a batch at the stage configs' shape", "",
        f"{datetime.date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} cores; "
        f"{ROWS} rows x {LENGTH} positions a batch, understanding : generation 1 : 1, {args.batches} batches each.", "",
        "| data | mean sample (tokens, the kinds 1 : 1) | tiles a batch (`max_images`) | `lookahead` | blocks | "
        "samples a batch | "
        "real tokens | lowest batch | most a long run can hold, whole samples | seconds a batch (reading and "
        "packing) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "Each sample goes into the fullest row with room for it, and a batch chooses among the oldest waiting "
        "group and `lookahead` later ones the group that strands the least room (room no sample in that window "
        "is short enough to use); it closes when none of them fits, by tokens or by tiles. With one tile a "
        "sample, the configs' earlier budget of 64 tiles filled under half of the batch; 192 leave the tokens to "
        "decide for release-sized samples. Those (~1,920 positions) go two to a 4,096-position row, so no "
        "choice of whole samples fills more than 2 x their mean / 4,096 = 93.8 % over a long run (the bound "
        "column, `data.packing.whole_sample_bound`, which the training log also states at its start: a row "
        "holds at most as many samples as the shortest fit in it, a batch at most as many as its tiles allow, "
        "and in a long run every sample is drawn in turn). The rest of this paragraph describes the run with the "
        "defaults of 2026-12-06; a run with other flags has its own figures in the tables above. A few batches "
        "can pass the bound by taking the longer samples first, as the windows did (94.4 % from 65 groups, "
        "95.0 % from 257, the lowest batches 93.8 % and 94.4 %): the shorter ones wait in the window and fill "
        "later batches. The 7B demo data's "
        "~855-position samples are of near-equal length and go four to a row (4 x 855 / 4,096 = 83.5 %; they "
        "take 256 tiles for that, so 192 stop it at 62.6 %), which no choice improves. More than the bound "
        "would need samples split across rows, which the reference never does and neither do "
        "we. The shapes world's ~77-token samples fill 99.3 % in order and 99.8 % chosen, given the tiles "
        "(thousands of its 64 px pictures a batch at this length). Packed in 32 blocks (each chip's 2 rows with "
        "its own 1/32 of the tiles, as training on 32 chips packs them) the fill is the same. The seconds a "
        "batch are this host's reading and packing (the first batch, which opens the streams, untimed); the "
        "choice costs most where thousands of small samples go into a batch.",
    ]
    write_report(lines + [""], args.out)


if __name__ == "__main__":
    main()
