"""Peak host memory of reading and converting a checkpoint, against transformers' from_pretrained.

Writes a synthetic bfloat16 Chameleon decoder checkpoint (default ~1.3 GB), then runs each step
in a fresh process and records its peak resident memory minus that of a process that only imports
the same libraries (anonymous memory; see `_SAMPLER`). The claim under test: converting needs about the checkpoint's size once, not
twice.

    python benchmarks/convert_memory.py [--layers 8 --hidden 2048] [--out benchmarks/results/convert_memory.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

from report import count, cpu_name, out_path, write_report

STEPS = {
    "import only (ours)": "import unitoken_jax",
    "import only (torch)": "import torch, transformers",
    "ours: unitoken convert HF -> Orbax": "from unitoken_jax.cli import main; main(['convert', '--from', HF, '--to', ORBAX])",
    "ours: unitoken convert Orbax -> HF (0.25 GB shards)": "from unitoken_jax.cli import main; main(['convert', '--from', ORBAX, '--to', BACK, '--max-shard-gb', '0.25'])",
    "ours: unitoken_jax.load (bfloat16 params)": "import unitoken_jax; unitoken_jax.load(HF, param_dtype='bfloat16', progress=False)",
    "transformers: from_pretrained (bfloat16)": (
        "import torch; from transformers import ChameleonForConditionalGeneration as C; "
        "C.from_pretrained(HF, dtype=torch.bfloat16)"),
}


def write_checkpoint(path: str, layers: int, hidden: int, vocab: int) -> int:
    import ml_dtypes
    from safetensors.numpy import save_file
    from transformers import ChameleonConfig

    inter = int(hidden * 2.6875)
    heads = hidden // 128
    cfg = ChameleonConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocabulary_map={"<image>": 8711},
                          vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
                                         num_res_blocks=1, latent_channels=8, attn_resolutions=[], resolution=32))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        for n in ("q_norm", "k_norm"):
            shapes[p + f"self_attn.{n}.weight"] = (heads, 128)
            shapes[p + f"self_attn.{n}.bias"] = (heads, 128)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    os.makedirs(path, exist_ok=True)
    tensors = {k: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16) for k, s in shapes.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    return os.path.getsize(os.path.join(path, "model.safetensors"))


# Peak *anonymous* memory, sampled every 10 ms: safetensors maps its files, and the mapped pages
# it touched count in RSS as page cache the kernel can drop, not as memory the process needs.
# (ru_maxrss would also be wrong: Linux carries it over from the parent across exec.)
_SAMPLER = """
import threading, time
_peak = [0]
def _sample():
    while True:
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon'):
                _peak[0] = max(_peak[0], int(line.split()[1]))
        time.sleep(0.01)
threading.Thread(target=_sample, daemon=True).start()
"""


def peak_rss_mb(code: str, env: dict[str, str]) -> float:
    wrapper = (f"{_SAMPLER}\nHF, ORBAX, BACK = {env['HF']!r}, {env['ORBAX']!r}, {env['BACK']!r}\n{code}\n"
               "time.sleep(0.05)\nprint('PEAK', _peak[0])")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1].split()[1]) / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=count(1), nargs="+", default=[8, 16])
    parser.add_argument("--hidden", type=count(1), default=2048)
    parser.add_argument("--vocab", type=count(1), default=65536)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/convert_memory.md (another shape: "
                                                    "its trial/ folder)")
    args = parser.parse_args()
    args.out = out_path(parser, args, "convert_memory.md", shape=("layers", "hidden", "vocab"))
    lines = ["# Peak host memory: reading and converting bfloat16 checkpoints", "",
             f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
             f"Chameleon-shaped decoders with hidden {args.hidden} and vocab {args.vocab}. Peak anonymous memory "
             "(sampled every 10 ms) above a process that only imports the same libraries.", "",
             "transformers' `from_pretrained` leaves the weights on the memory-mapped file (page cache, "
             "not counted here) until they are touched; ours copies them into device buffers.", ""]
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            env = {"HF": os.path.join(tmp, "hf"), "ORBAX": os.path.join(tmp, "orbax"), "BACK": os.path.join(tmp, "back")}
            size_mb = write_checkpoint(env["HF"], layers, args.hidden, args.vocab) / 2**20
            rows = {name: peak_rss_mb(code, env) for name, code in STEPS.items()}
        base_ours, base_torch = rows["import only (ours)"], rows["import only (torch)"]
        lines += [f"## {layers} layers: checkpoint {size_mb:.0f} MiB", "",
                  "| step | peak above imports (MiB) | beyond the checkpoint's size (MiB) | × checkpoint size |",
                  "|---|---|---|---|"]
        for name, mb in rows.items():
            if name.startswith("import"):
                continue
            extra = mb - (base_torch if name.startswith("transformers") else base_ours)
            lines.append(f"| {name} | {extra:.0f} | {extra - size_mb:.0f} | {extra / size_mb:.2f} |")
        lines.append("")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
