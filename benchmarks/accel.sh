#!/usr/bin/env bash
# The accelerator measurements, as one prepared run for a lent GPU (or a TPU VM): the training step
# per attention backend at ~1B parameters (benchmarks/train_accel.py) and decoding a 7B-shaped model
# in bfloat16 and int8 (benchmarks/decode_accel.py). Each has its own time limit, so one that
# overruns still leaves the other's result; the tables go to OUT (default benchmarks/results).
#
#   bash benchmarks/accel.sh [OUT]        # e.g. OUT=$OUT on the device tool's machine
#
# Environment: PEAK_TFLOPS (dense bf16 peak for MFU, default 989 = H100/H200 SXM), BANDWIDTH_GBS
# (HBM bandwidth for the decode roofline, default 4800 = H200), BACKENDS (default xla,cudnn),
# TRAIN_LIMIT / DECODE_LIMIT (seconds, default 150 / 420: on an H200 the training
# run at 4 rows took a minute; the decode run compiles an unrolled 7B loop per cache size).
#
# An image with JAX, flax, optax and orbax but not ml_collections: download its wheel here into a
# git-ignored .whl/ (pip download --no-deps ml_collections==1.1.0 -d .whl), carry .whl, and this
# script installs it into /tmp/site first.
set -u
case "${1:-}" in
    # (--help was taken as OUT, and the benchmarks ran)
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$0: unknown option $1 (usage: bash benchmarks/accel.sh [OUT])" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
OUT=${1:-benchmarks/results}
# (a file there, or no right to write: both benchmarks had run, minutes of a lent machine, and written nothing)
if ! mkdir -p "$OUT" || [ ! -w "$OUT" ]; then
    echo "$0: OUT $OUT is not a folder this can write in" >&2
    exit 2
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, orbax.checkpoint, ml_collections; print('jax', jax.__version__, jax.devices())" \
    || { echo "missing packages (see the comment at the top of $0)"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
timeout "${TRAIN_LIMIT:-150}" python3 benchmarks/train_accel.py --backends "${BACKENDS:-xla,cudnn}" \
    --peak-tflops "${PEAK_TFLOPS:-989}" --out "$OUT/train_accel.md" 2>&1 | tee "$OUT/train_accel.log"
timeout "${DECODE_LIMIT:-420}" python3 benchmarks/decode_accel.py --bandwidth-gbs "${BANDWIDTH_GBS:-4800}" \
    --out "$OUT/decode_accel.md" 2>&1 | tee "$OUT/decode_accel.log"
