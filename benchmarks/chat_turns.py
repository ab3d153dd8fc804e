"""What a chat turn costs with and without the kept KV cache (`DecodeLoop.generate(reuse_cache=True)`,
which `UniTokenPipeline.chat` uses): each turn's time, the positions taken from the cache, and the
programs XLA compiled (prefill, extend, decode loop), each mode with programs of its own (the caches
cleared between them).

1. The bundled shapes-world model on this CPU (unrolled layers): a conversation about a picture,
   its answers drawn by the model and put back into the history as a chat does.
2. The accelerators' layout (scanned layers, one cache length a call) on a random model with the
   release's 4,096 positions: a text conversation that fills them. Its compile count
   is what a TPU or GPU pays for.
3. With `--aot TOPOLOGY` (libtpu installed): the 7B's programs a turn compiles (int8 weights),
   compiled ahead of time for that chip here, with their compile times and memory.

    python benchmarks/chat_turns.py --aot v5e:1x1       # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from report import cpu_name, out_path, write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_programs() -> None:
    """Each column compiles its own programs: decode loops of one config share them in a process
    (`decode._steps`) and jax's caches keep what was compiled, so until 2026-12-05 the column with
    the kept cache ran on programs the column without it had compiled."""
    from unitoken_jax.inference import decode

    decode._steps.cache_clear()
    jax.clear_caches()


def programs(loop) -> dict[str, int]:
    """Programs compiled so far for each of the loop's jitted steps."""
    return {name: getattr(loop, name)._cache_size() if name in loop.__dict__ else 0
            for name in ("_prefill", "_extend", "_run", "_grow")}


def converse(pipe, turns, reuse: bool, **options):
    """Runs the turns (text, picture or None) as one conversation; returns a row per turn."""
    from unitoken_jax.tokenizer.conversation import SequenceTooLong

    loop = pipe.decode_loop
    messages, images, rows = [], [], []
    for i, (text, picture) in enumerate(turns):
        messages.append({"from": "human", "value": text})
        images += [picture] if picture is not None else []
        try:
            request = pipe.chat_request(messages, list(images), seed=i, **options)
        except SequenceTooLong:  # the conversation fills the model: it ends here
            break
        reused = loop._reusable(loop._kept, request) if reuse and loop._kept is not None else 0
        before = programs(loop)
        start = time.perf_counter()
        (parts,) = pipe.run([request], repair=True, reuse_cache=reuse)
        seconds = time.perf_counter() - start
        after = programs(loop)
        answer = "".join(p for p in parts if isinstance(p, str))
        rows.append(dict(turn=i + 1, prompt=len(request.tokens), reused=reused, seconds=seconds, answer=answer,
                         pictures=sum(not isinstance(p, str) for p in parts),
                         compiled={k: after[k] - before[k] for k in after if after[k] > before[k]}))
        messages.append({"from": "gpt", "value": answer})
    return rows


def converse_tokens(loop, question, reuse: bool, max_new: int, positions: int):
    """A conversation at the level of ids: each turn's prompt is the last one's, the ids drawn
    and `question` again, until the next would not fit the model's `positions`."""
    from unitoken_jax.inference.decode import Request

    prompt, rows = np.asarray(question, np.int32), []
    while len(prompt) + max_new <= positions:
        request = Request(prompt, max_new_tokens=max_new, temperature=1.0, seed=len(rows), stop_tokens=())
        reused = loop._reusable(loop._kept, request) if reuse and loop._kept is not None else 0
        before = programs(loop)
        start = time.perf_counter()
        drawn = loop.generate([request], reuse_cache=reuse).tokens[0]
        seconds = time.perf_counter() - start
        after = programs(loop)
        rows.append(dict(turn=len(rows) + 1, prompt=len(prompt), reused=reused, seconds=seconds,
                         answer=drawn.tolist(), pictures=0,
                         compiled={k: after[k] - before[k] for k in after if after[k] > before[k]}))
        prompt = np.concatenate([prompt, drawn, question[1:]]).astype(np.int32)
    return rows


def table(rows_off, rows_on) -> list[str]:
    lines = ["| turn | prompt | without: s | compiled | with: s | reused | compiled | same answer |",
             "|---|---|---|---|---|---|---|---|"]

    def compiled(c):
        return ", ".join(f"{k.strip('_')} {v}" for k, v in c.items()) or "-"

    for a, b in zip(rows_off, rows_on):
        lines.append(f"| {a['turn']} | {a['prompt']} | {a['seconds']:.2f} | {compiled(a['compiled'])} | "
                     f"{b['seconds']:.2f} | {b['reused']} | {compiled(b['compiled'])} | "
                     f"{'yes' if a['answer'] == b['answer'] and a['pictures'] == b['pictures'] else 'no'} |")
    total = lambda rows: sum(r["seconds"] for r in rows)  # noqa: E731
    count = lambda rows: sum(sum(r["compiled"].values()) for r in rows)  # noqa: E731
    lines.append(f"| all | | **{total(rows_off):.2f}** | {count(rows_off)} programs | **{total(rows_on):.2f}** | | "
                 f"{count(rows_on)} programs | |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aot", default=None, metavar="TOPOLOGY",
                        help="also compile the 7B's chat programs for a TPU topology, e.g. v5e:1x1 (needs libtpu)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/chat_turns.md")
    args = parser.parse_args()
    args.out = out_path(parser, args, "chat_turns.md")

    import unitoken_jax
    from unitoken_jax.inference.decode import DecodeLoop
    from unitoken_jax.world import default, shapes

    lines = [f"# Chat turns with and without the kept KV cache ({datetime.date.today()}, "
             f"{cpu_name()}, {os.cpu_count()} CPU cores, jax {jax.__version__})", ""]

    # 1. the bundled model, as `unitoken chat` runs it
    picture = shapes.draw([shapes.Thing("green", "square", "bottom right")])
    questions = ["<|image|>\nWhat colour is the shape?", "Where is the shape?", "What shape is it?",
                 "What colour is the shape?", "Draw a red circle at the top left", "Where is the shape?"]
    turns = [(q, picture if i == 0 else None) for i, q in enumerate(questions)]
    lines += ["## 1. The bundled model on this CPU (unrolled layers, 512 positions)", "",
              "Six turns about one picture (the fifth asks for a drawing), each model's answer put back into the "
              "history; seconds per turn with a fresh pipeline per column (its compiles included), `reused` the "
              "positions taken from the kept cache, `compiled` the programs the turn added."]
    for title, options in (("`pipe.chat` (unguided)", {}), ("guided, as `unitoken chat` runs it (--cfg 3)",
                                                            {"cfg": 3.0})):
        results = {}
        for reuse in (False, True):
            fresh_programs()
            pipe = default.pipeline()
            results[reuse] = converse(pipe, turns, reuse, **options)
        lines += ["", f"### {title}", ""] + table(results[False], results[True])
    base = pipe
    print("\n".join(lines), flush=True)

    # 2. the accelerators' layout at the release's 4,096 positions
    cfg = base.model.config  # the bundled model's shape; random weights, 4,096 positions
    cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, max_position_embeddings=4096))
    model = unitoken_jax.UniTokenModel.random(cfg, seed=0)
    turn = pipe.chat_request([{"from": "human", "value": "Tell me more: " + "why does it matter here? " * 6}])
    results = {}
    for reuse in (False, True):
        fresh_programs()
        loop = DecodeLoop(cfg, model.params, layers="scan", banned_ids=np.flatnonzero(~base.decode_loop._ok_ids))
        results[reuse] = converse_tokens(loop, turn.tokens, reuse, max_new=160, positions=4096)
    lines += ["", "## 2. Scanned layers (the accelerators' layout), the bundled model's shape with 4,096 positions, "
              "random weights", "",
              "Turns of the same question (the first prompt 135 ids; with the turn's template 134 more each turn), "
              "each answered with 160 tokens (random text, no stop token), the next turn's prompt being the last "
              "one's, its answer and the question (as a chat whose answers re-encode to their own ids, which the "
              "bundled model's do: section 1), until the conversation fills the 4,096 positions; on this CPU. Compile "
              "counts, not the CPU seconds, are what carries over to a TPU: there each program of the 7B takes "
              "seconds to compile.", ""]
    lines += table(results[False], results[True])
    if args.aot:
        lines += ["", *aot_turns(args.aot)]
    write_report(lines, args.out)


def aot_turns(topology: str) -> list[str]:
    """The 7B's programs a chat turn compiles on a TPU chip (int8 weights), compiled ahead of time
    here: without the kept cache a turn whose history reaches a new width compiles a prefill and a
    loop; with it, a turn compiles an extend only where its new messages' width or the cache's
    length is new."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import aot_check
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from unitoken_jax import configs
    from unitoken_jax.inference.decode import DecodeLoop, Request
    from unitoken_jax.models.config import UniTokenConfig
    from unitoken_jax.models.unitoken import abstract_params, param_shardings

    mesh = aot_check.topology_mesh(topology, (1, aot_check.topology_devices(topology).size, 1))
    hbm = aot_check.hbm_bytes(mesh.devices.flat[0])
    config = UniTokenConfig.from_dict(configs.get_config("model.py:7b").model).replace(
        dtype="bfloat16", param_dtype="bfloat16", remat_policy="none", quantize="int8")
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_params(config),
                          param_shardings(config, mesh))
    loop = DecodeLoop(config, params, mesh)

    def compiled(lowered):
        start = time.perf_counter()
        c = lowered.compile()
        m = c.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        return time.perf_counter() - start, total

    rows = []
    history = 1000  # a conversation of ~1,000 positions, the next turn's budget 512 tokens
    request = Request(np.full(history, 9000, np.int32), max_new_tokens=512)
    start = time.perf_counter()
    prefill, run = loop.lower([request])
    lowering = time.perf_counter() - start
    rows.append(("without: prefill (width 1,024, cache 1,536; lowered with the loop, compiled)", lowering,
                 compiled(prefill)[1]))
    seconds, total = compiled(run)
    rows.append(("without: decode loop (cache 1,536)", seconds, total))
    replicated = NamedSharding(mesh, PartitionSpec())
    cache_sharding = prefill.compile().output_shardings[1]
    for length, width in ((2048, 64), (4096, 64)):
        cache = prefill.out_info[1]
        cache = {name: jax.ShapeDtypeStruct(a.shape[:-2] + (length,) + a.shape[-1:], a.dtype,
                                            sharding=cache_sharding[name])
                 if name != "index" else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cache_sharding[name])
                 for name, a in cache.items()}
        batch = [jax.ShapeDtypeStruct((1, width), dt, sharding=replicated) for dt in (jnp.int32, jnp.int32, bool,
                                                                                      jnp.int32)]
        seconds, total = compiled(loop._extend.lower(loop.params, cache, *batch, None))
        rows.append((f"with: extend ({width} new positions, cache {length:,})", seconds, total))
    _, run = loop.lower([Request(np.full(4096 - 512, 9000, np.int32), max_new_tokens=512)])
    seconds, total = compiled(run)
    rows.append(("both: decode loop (cache 4,096, the model's length)", seconds, total))
    lines = [f"## 3. The 7B (int8 weights) on one {topology} chip: what a turn compiles (AOT from this CPU)", "",
             "A turn without the kept cache compiles the first two programs whenever its history reaches a new "
             "width (a multiple of 32); with it, a turn compiles an extend where its new messages' width or the "
             "cache's length is new, and a loop where the cache doubled.", "",
             "| program | compile s | memory a chip |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {total / 2**30:.2f} of {hbm / 2**30:.2f} GiB |" for name, seconds, total
              in rows]
    return lines


if __name__ == "__main__":
    main()
