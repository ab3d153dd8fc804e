"""The accelerator benchmarks (benchmarks/accel.sh) only run where a GPU or TPU is lent, which is
rare; these check on the CPU, at tiny shapes, that they still run and report what they claim, so
that a session with a device spends its minutes measuring, not debugging. The CPU decode benchmark
(benchmarks/decode.py, run on demand for the README's figures) too: it once stopped running for a
day unnoticed; and the CPU train-step benchmark (benchmarks/train_step.py)."""

import os
import re
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import train_accel  # noqa: E402


def _run(script, *args, tmp_path):
    out = tmp_path / "result.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


def _table(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| attention") and not line.startswith("| weights")]


def test_packed_rows_fill_every_position_with_samples_whose_positions_restart():
    args = type("A", (), dict(smoke=True, length=256, rows=3, remat="none", block=128, devices=1))()
    config = train_accel.train_config(args, "xla")
    batch, context = train_accel.packed_batch(config, samples_per_row=5, seed=3)
    seg, pos = batch["segment_ids"], batch["positions"]
    assert seg.shape == (3, 256) and (seg > 0).all()
    for b in range(3):
        assert sorted(set(seg[b].tolist())) == [1, 2, 3, 4, 5]
        assert (np.diff(seg[b]) >= 0).all()  # each sample one contiguous run
        for s in range(1, 6):
            np.testing.assert_array_equal(pos[b][seg[b] == s], np.arange((seg[b] == s).sum()))
    assert context == float((pos + 1).mean())
    np.testing.assert_array_equal(batch["labels"], batch["tokens"])


def test_the_packing_benchmark_times_batches_after_the_first_only():
    """With one batch nothing is timed (the first opens the streams): it said 0.00 s a batch."""
    import tempfile

    import packing

    path = packing.shapes_world(tempfile.mkdtemp(), 100)
    *_, one = packing.measure(path, 192, 0, 1)
    *_, two = packing.measure(path, 192, 0, 2)
    assert one is None and two > 0


def test_the_one_billion_shape_has_about_a_billion_decoder_parameters():
    args = type("A", (), dict(smoke=False, length=4096, rows=8, remat="none", block=512, devices=1))()
    config = train_accel.train_config(args, "xla")
    from unitoken_jax.models.unitoken import abstract_params

    params = abstract_params(config.model)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["decoder"]))
    assert 1.0e9 < n < 1.2e9, n


def test_the_train_step_benchmark_runs_and_reports_a_missing_backend(tmp_path):
    text = _run("train_accel.py", "--smoke", "--backends", "xla,cudnn", "--peak-tflops", "1", tmp_path=tmp_path)
    rows = {r[0]: r for r in _table(text)}
    xla = rows["xla"]
    step_s, tokens_s, mfu, loss = float(xla[1]), float(xla[2]), float(xla[4].rstrip("%")) / 100, float(xla[7])
    assert float(xla[5]) > 0  # the compiler's temporaries: the activations a step keeps, at least
    assert step_s > 0 and abs(tokens_s - 2 * 256 / step_s) / tokens_s < 0.01  # 2 rows x 256 real positions
    assert 0 < mfu < 1  # a CPU step is far below 1 TFLOP/s
    assert 0 < loss < np.log(9216) + 1  # random weights start near ln(vocab)
    assert "could not run" in rows["cudnn"][1] and "available there" in rows["cudnn"][1]


def test_the_decode_benchmark_runs_at_a_tiny_shape(tmp_path):
    text = _run("decode_accel.py", "--model", "tiny", "--grid", "2", "--batch", "2", tmp_path=tmp_path)
    assert "64px image = 23 tokens" in text  # 2 grid units a side: 4 x 4 codes, 4 x 5 + 3 tokens
    rows = {r[0]: r for r in _table(text)}
    # a CPU's own choice: float weights unrolled (the copy fits here), int8 scanned; bfloat16 scanned beside
    assert list(rows) == ["bfloat16, unrolled layers (auto)", "int8, scanned layers (auto)", "bfloat16, scanned layers"]
    for r in rows.values():
        first_1, first_2 = (float(v) for v in r[6].split(" / "))
        assert float(r[2]) > 0 and float(r[4]) > 0
        assert first_1 > float(r[2]) and first_2 > 0  # a first call compiles its loop, so it takes longer
    assert float(rows["int8, scanned layers (auto)"][1]) <= float(rows["bfloat16, scanned layers"][1])


def test_the_cpu_decode_benchmark_runs_at_a_tiny_shape_and_its_ratios_are_its_figures(tmp_path):
    text = _run("decode.py", "--layers", "1", "--hidden", "64", "--grid", "1", "--batch", "2", "--rounds", "2",
                tmp_path=tmp_path)
    assert text.startswith("# Decoding speed: one 32 x 32 image")
    rows = {r[0]: r for r in _table(text)}
    # ours and the reference timed in turn, each ratio (checked below against the medians printed)
    # within the range of the rounds' own ratios stated beside it
    assert "Each side is the median of 2 runs, timed in turn" in text
    # where the reference's step goes: its parts, each timed, add up to the whole token
    split = text.split("Where the reference's step goes")[1].split("How close a step is")[0]
    header, values = [r for r in _table(split) if r[0] != "---"][:2]
    assert header[0] == "decoder layers" and header[-1] == "a token in all", split
    parts = [float(v) for v in values]
    assert all(v >= 0 for v in parts) and parts[0] > 0 and parts[1] > 0, split
    assert abs(sum(parts[:-1]) - parts[-1]) <= 0.02 + 0.01 * parts[-1], split
    for name in ("seconds per image, batch 1", "images per second, batch 2, one prompt",
                 "images per second, batch 2, 2 prompts", "bfloat16: seconds per image, batch 1",
                 "bfloat16: images per second, batch 2, one prompt", "bfloat16: images per second, batch 2, 2 prompts"):
        said, low, high = map(float, re.match(r"([\d.]+)x \(rounds ([\d.]+)-([\d.]+)x\)", rows[name][3]).groups())
        assert low - 0.05 <= said <= high + 0.05, (name, said, low, high)
    # the ratios against the figures as printed: seconds to 3 significant digits, images a second to
    # 3 decimals, ratios to 1 decimal
    ours_1, ref_1, faster_1 = (float(v.split()[0].rstrip("x")) for v in rows["seconds per image, batch 1"][1:4])
    assert abs(faster_1 - ref_1 / ours_1) <= 0.05 + 0.011 * ref_1 / ours_1
    # several pictures of one prompt: against the reference's own batch (`num_return_sequences`); of
    # several prompts: against as many runs of it (a prompt a call), images a second of one run
    ours_b, ref_b, faster_b = (float(v.split()[0].rstrip("x"))
                               for v in rows["images per second, batch 2, one prompt"][1:4])
    assert "num_return_sequences" in rows["images per second, batch 2, one prompt"][2]
    assert abs(faster_b - ours_b / ref_b) <= 0.05 + 1.01 * ours_b / ref_b * (0.0005 / ours_b + 0.0005 / ref_b)
    ours_p, ref_p, faster_p = (float(v.split()[0].rstrip("x"))
                               for v in rows["images per second, batch 2, 2 prompts"][1:4])
    assert abs(ref_p - 1 / ref_1) <= 0.0005 + 0.006 / ref_1
    assert abs(faster_p - ours_p / ref_p) <= 0.05 + 1.01 * ours_p / ref_p * (0.0005 / ours_p + 0.0005 / ref_p)
    # bfloat16 on both sides: the same ratios, and each side's speed-up over its float32 run above
    bf_1, bref_1, bfaster_1, bup_1, bref_up = (float(v.split()[0].rstrip("x"))
                                                 for v in rows["bfloat16: seconds per image, batch 1"][1:6])
    assert abs(bfaster_1 - bref_1 / bf_1) <= 0.05 + 0.011 * bref_1 / bf_1
    assert abs(bup_1 - ours_1 / bf_1) <= 0.01 + 0.011 * ours_1 / bf_1
    assert abs(bref_up - ref_1 / bref_1) <= 0.01 + 0.011 * ref_1 / bref_1
    one_prompt, prompts = ("bfloat16: images per second, batch 2, one prompt",
                           "bfloat16: images per second, batch 2, 2 prompts")
    bf_b, bref_b, bfaster_b, bup_b, bref_up_b = (float(v.split()[0].rstrip("x")) for v in rows[one_prompt][1:6])
    assert abs(bfaster_b - bf_b / bref_b) <= 0.05 + 1.01 * bf_b / bref_b * (0.0005 / bf_b + 0.0005 / bref_b)
    assert abs(bup_b - bf_b / ours_b) <= 0.01 + 1.01 * bf_b / ours_b * (0.0005 / bf_b + 0.0005 / ours_b)
    assert abs(bref_up_b - bref_b / ref_b) <= 0.01 + 1.01 * bref_b / ref_b * (0.0005 / bref_b + 0.0005 / ref_b)
    bf_p, bref_p, bfaster_p, bup_p, bref_up_p = (float(v.split()[0].rstrip("x")) for v in rows[prompts][1:6])
    assert abs(bref_p - 1 / bref_1) <= 0.0005 + 0.006 / bref_1 and bref_up_p == bref_up
    assert abs(bfaster_p - bf_p / bref_p) <= 0.05 + 1.01 * bf_p / bref_p * (0.0005 / bf_p + 0.0005 / bref_p)
    assert abs(bup_p - bf_p / ours_p) <= 0.01 + 1.01 * bf_p / ours_p * (0.0005 / bf_p + 0.0005 / ours_p)
    growth = [r for label, r in rows.items()
              if label.startswith(("default:", "doubling:")) or "slots at a time" in label]
    assert len(growth) == 4 and all(float(r[2]) > 0 for r in growth)
    for label in ("2 (batch 1)", "4 (batch 2)"):
        full, model, ratio = (float(v) for v in rows[label][1:4])
        assert full > 0 and model > 0 and ratio > 0
    for label in ("2", "4"):
        bf16, int8, ratio = (float(v) for v in rows[label][1:4])
        assert bf16 >= 0 and int8 >= 0 and ratio > 0
    # the memory floor: the weights a step reads, from the shape (1 layer, hidden 64, MLP 172, 1 head
    # of 64, QK-norm per head; the head's 8,196 code columns), in float32
    floor_text = text.split("The memory floor")[1].split("Weight formats")[0]
    d, i = 64, int(64 * 2.6875)
    layer = 4 * d * d + 3 * d * i + 2 * d + 2 * 2 * d  # q/k/v/o, gate/up/down, two RMSNorms, q/k norms
    weights_mib = 4 * (layer + d + 8196 * d) / 2**20  # + the final norm and the code columns
    assert f"every weight once ({weights_mib:.3g} MiB" in floor_text
    bandwidth = float(floor_text.split(" GB/s")[0].rsplit("(", 1)[1]) * 1e9
    floor = {r[0]: r for r in _table(floor_text)}
    kv = {}
    for label in ("2", "4"):
        step_ms, read, floor_ms, share = floor[label][1:5]
        total, parts = read.split(" (")
        w, kv[label] = (float(v) for v in parts.rstrip(")").split(" + "))
        assert w == float(f"{weights_mib:.3g}") and abs(float(total) - w - kv[label]) <= 0.01 * float(total)
        assert abs(float(floor_ms) - float(total) * 2**20 / bandwidth * 1e3) <= 0.01 * float(floor_ms) + 1e-3
        assert abs(float(share) - float(floor_ms) / float(step_ms)) <= 0.01 + 0.01 * float(share)
    assert abs(kv["4"] - 2 * kv["2"]) <= 0.01 * kv["4"]  # twice the rows over the same cache lengths
    # a step reads each row's keys and values (1 layer, 64 wide, float32) over the cache's lengths
    lengths = [int(n) for n in re.search(r"by default to ([\d, ]+) slots", text).group(1).split(", ")]
    per_slot_mib = 2 * 2 * d * 4 / 2**20  # 2 rows, keys and values
    assert min(lengths) * per_slot_mib * 0.99 <= kv["2"] <= max(lengths) * per_slot_mib * 1.01


def test_the_cache_block_benchmark_runs_at_a_tiny_shape_and_its_ratios_are_its_figures(tmp_path):
    text = _run("decode_blocks.py", "--layers", "1", "--hidden", "64", "--grid", "1", "--batch", "2",
                tmp_path=tmp_path)
    assert "| 2 rows (batch 1 with CFG), ms | 4 rows (batch 2), ms | vs every slot, 2 / 4 rows |" in text
    rows = [r for r in _table(text) if not r[0].startswith("loop")]
    assert [r[0].split(",")[0] for r in rows] == ["scanned", "scanned", "unrolled"]
    whole = [float(rows[0][1]), float(rows[0][2])]
    for r in rows:
        ms = [float(r[1]), float(r[2])]
        ratios = [float(x) for x in r[3].split(" / ")]
        assert all(m > 0 for m in ms)
        # the ratios against the figures as printed: ms rounded to 0.05 either way, a ratio to 0.005
        assert all(abs(q - m / w) <= 0.0051 + 0.051 / w + 0.051 * m / w**2 for q, m, w in zip(ratios, ms, whole)), r


def test_the_cpu_train_step_benchmark_runs_at_a_tiny_shape_and_its_ratios_are_its_figures(tmp_path):
    text = _run("train_step.py", "--steps", "2", "--hidden", "64", "--layers", "1", "--rows", "2", "--length", "256",
                "--repeats", "1", "--ref-batch", "2", tmp_path=tmp_path)
    peaks = re.search(r"XLA (\d+) GFLOP/s, torch (\d+) GFLOP/s", text)
    peak = {"reference": float(peaks.group(2)), "ours": float(peaks.group(1))}
    rows = [r for r in _table(text) if r[0].startswith(("reference", "ours"))]
    # the reference's batches in stream order and clustered by length (its sampler on a long dataset)
    assert [r[0].split(" (")[0] for r in rows] == [
        "reference, stream order", "reference, length-clustered", "ours, layers unrolled", "ours, layers scanned",
        "ours, layers unrolled, loss_chunk=256"]
    ours_tokens = int(rows[2][2])
    # the same samples, less the reference's half-filled batches (a sample of 256 tokens at most, a data type)
    assert all(ours_tokens - 2 * 256 <= int(r[2]) <= ours_tokens for r in rows[:2])
    for r in rows:
        batches, tokens, padding, seconds, tps, gflops, share = r[1:8]
        assert r in rows[:2] or int(tokens) == ours_tokens
        assert abs(float(tps) - int(tokens) / float(seconds)) <= 0.01 * float(tps) + 0.05 * float(tps) / float(seconds)
        side = r[0].split(",")[0].split(" ")[0]
        assert abs(float(share.rstrip("%")) - 100 * float(gflops) / peak[side]) <= 1.0
        if side == "ours":  # 2 timed batches of 2 x 256 positions
            real = int(tokens) / (2 * 2 * 256)
            assert int(batches) == 2 and abs(float(padding.rstrip("%")) - 100 * (1 - real)) <= 0.5
    for ref in rows[:2]:
        ref_tps = float(ref[5])
        for r in rows[2:]:
            said = f"**Ours, {r[0].split(' (')[0][6:]} / {ref[0].split(' (')[0]}: "
            ratio = float(re.search(re.escape(said) + r"([\d.]+)x", text).group(1))
            # the ratio of the printed rates (each rounded to a token a second)
            rate = float(r[5])
            assert abs(ratio - rate / ref_tps) <= 0.005 + rate / ref_tps * (0.5 / rate + 0.5 / ref_tps)


def test_the_cpu_dots_benchmark_runs_at_a_tiny_shape_and_its_step_estimate_is_its_products(tmp_path):
    """benchmarks/cpu_dots.py: the streamed products' rates are their shapes over their times, and
    the decode step's weight products are 8 layers (4 of 512 x 512, 2 of 512 x 1376, one
    1376 x 512) and the code head, summed from the table's own times, XLA's and torch's."""
    text = _run("cpu_dots.py", "--quick", tmp_path=tmp_path)
    rows = [r for r in _table(text) if len(r) == 7 and " x " in r[0] and r[1].isdigit()]
    assert len(rows) == 4 * 2, text  # four kernel shapes at 1 and 2 rows
    us, torch = {}, {}
    for shape, n, xla_us, xla_gib, xla_gflops, torch_us, torch_gib in rows:
        d_in, d_out = map(int, shape.split(" x "))
        us[(d_in, d_out, int(n))], torch[(d_in, d_out, int(n))] = float(xla_us), float(torch_us)
        assert abs(d_in * d_out * 4 / 2**30 / (float(xla_us) / 1e6) - float(xla_gib)) <= 0.06 * float(xla_gib) + 0.1
        assert abs(2 * int(n) * d_in * d_out / (float(xla_us) / 1e6) / 1e9 - float(xla_gflops)) <= (
            0.06 * float(xla_gflops) + 1)
        assert float(torch_us) > 0 and float(torch_gib) > 0
    sums = re.findall(r"([\d.]+) against ([\d.]+) ms at (\d+) rows?", text)
    step = {int(n): (float(a), float(b)) for a, b, n in sums}
    assert sorted(step) == [1, 2], text
    for n in (1, 2):
        for side, t in enumerate((us, torch)):
            expected = 8 * (4 * t[(512, 512, n)] + 2 * t[(512, 1376, n)] + t[(1376, 512, n)]) + t[(512, 8192, n)]
            assert abs(step[n][side] - expected / 1e3) <= 0.02 * expected / 1e3 + 0.1, (step, expected)
    slots = [r for r in _table(text) if r[0] in ("16", "32")]
    assert len(slots) == 2 and all(float(c) > 0 for r in slots for c in r[1:]), text



def test_results_files_name_the_processor_and_the_vector_features_that_move_their_numbers(tmp_path):
    """benchmarks/report.cpu_name: the first processor's model name and, of its flags, AVX-512,
    AVX-512 BF16 and AMX (sessions land on AMD and Intel machines whose kernels differ)."""
    import platform

    import report

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu amx_bf16\n")
    assert report.cpu_name(str(info)) == f"AMD EPYC 9R14 ({platform.machine()}; AVX-512, AVX-512 BF16)"
    info.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert report.cpu_name(str(info)) == (
        f"Intel(R) Xeon(R) Processor ({platform.machine()}; AVX-512, AVX-512 BF16, AMX)")
    assert report.cpu_name(str(tmp_path / "none")).endswith(f"({platform.machine()})")


def test_accel_sh_help_shows_its_usage_and_runs_nothing(tmp_path):
    """`bash benchmarks/accel.sh --help` took --help as its OUT folder and started the benchmarks."""
    script = os.path.join(ROOT, "benchmarks", "accel.sh")
    r = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "bash benchmarks/accel.sh [OUT]" in r.stdout and "jax" not in r.stderr, r
    assert not os.path.exists(os.path.join(ROOT, "--help")) and not os.listdir(tmp_path)
    r = subprocess.run(["bash", script, "--out=x"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "unknown option --out=x" in r.stderr
    # an OUT it cannot write in stops it at once (both benchmarks had run, writing nothing)
    (tmp_path / "a file").write_text("")
    r = subprocess.run(["bash", script, str(tmp_path / "a file")], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 2 and "is not a folder this can write in" in r.stderr and "jax" not in r.stdout, r


def test_a_trial_run_leaves_the_committed_results_alone_and_a_bad_place_or_count_is_refused_first(tmp_path, capsys,
                                                                                                 monkeypatch):
    """A smoke run (`train_accel.py --smoke`, `decode_accel.py --model tiny`, `cpu_dots.py --quick`)
    or one of another shape wrote over the committed results file: it now goes to the git-ignored
    benchmarks/results/trial/ unless --out says where; the default is the repository's folder
    from any directory (half the scripts wrote under the caller's). An --out that cannot be
    written, and a count of 0, are refused before anything is measured (a traceback after it)."""
    import argparse

    import report

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=report.count(1), default=8)
    parser.add_argument("--out", default=None)
    results = os.path.join(ROOT, "benchmarks", "results")
    assert report.out_path(parser, parser.parse_args([]), "x.md") == os.path.join(results, "x.md")
    assert report.out_path(parser, parser.parse_args([]), "x.md", trial=True) == os.path.join(results, "trial", "x.md")
    assert report.out_path(parser, parser.parse_args(["--layers", "1"]), "x.md", shape=("layers",)) == \
        os.path.join(results, "trial", "x.md")
    assert report.out_path(parser, parser.parse_args(["--layers", "8"]), "x.md", shape=("layers",)) == \
        os.path.join(results, "x.md")
    assert report.out_path(parser, parser.parse_args(["--out", "y.md"]), "x.md", trial=True) == "y.md"
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/benchmarks/results/trial/" in f.read().split()
    (tmp_path / "a file").write_text("")
    for argv, said in ((["train_accel.py", "--smoke", "--out", str(tmp_path / "a file" / "x.md")], "is a file"),
                       (["decode.py", "--rounds", "0"], "argument --rounds: 0 is out of range: it must be at least 1"),
                       (["cli_latency.py", "--runs", "0"], "argument --runs: 0 is out of range: it must be at least 1"),
                       (["decode_accel.py", "--model", "bogus"], "invalid choice: 'bogus'"),
                       (["finetune_fit.py", "--lora-batches", "8,x"], "'x' is not a whole number")):
        monkeypatch.setattr(sys, "argv", [argv[0], *argv[1:]])
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as e:  # (in this process: each script's imports once, not a process each)
            runpy.run_path(os.path.join(ROOT, "benchmarks", argv[0]), run_name="__main__")
        assert e.value.code == 2 and said in capsys.readouterr().err, argv
    assert not os.path.exists(tmp_path / "benchmarks")
