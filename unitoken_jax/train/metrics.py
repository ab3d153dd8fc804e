"""Training metrics: averaged over a logging window, written to the console (logging) and to
TensorBoard event files (the `tensorboard` package's writer; TensorFlow is not needed).

Tokens/s counts real tokens only (positions inside a packed sample, not padding). MFU is
estimated from an analytic FLOP count, because XLA's cost analysis counts a scanned layer once:
per token, 2 x params forward, 2 x params for the activation gradients, and 2 x trainable params
for the weight gradients (a frozen decoder still backpropagates into the ViT in stage I), plus
attention (12 x layers x hidden x context per token, forward and backward), and the same for the
ViT per image patch. It is reported only on chips whose peak bf16 FLOP/s is known.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import jax
import numpy as np

log = logging.getLogger(__name__)

# dense bf16 peak FLOP/s per chip / GPU
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return flops
    return None


class FlopCounter:
    """Analytic FLOPs of a train step: 2 x parameters x tokens forward, as much again for the
    gradients of the activations, and 2 x trainable parameters x tokens for their own gradients,
    plus the attention's scores and values (12 x layers x hidden x context a token). Every
    parameter counts, the input embedding table's too, though a lookup does no multiply: a count
    that leaves them out (PaLM's and MaxText's convention) reads lower (the 1B shape of
    benchmarks/train_accel.py: ~12 % of its step). The LM head counts at the positions that
    predict a token (`predicting`), where the step runs it (`models.loss.fused_lm_loss`): at
    every real token it had made a stage's MFU read high where few tokens are labelled (the tiny
    config's count was ~29 % high; the 7B's ~1.5-2 %)."""

    def __init__(self, model_config, abstract_params, trainable_mask):
        def count(part, trainable_only=False):
            tree = abstract_params.get(part, {})
            masks = trainable_mask.get(part, {})
            return sum(int(np.prod(a.shape)) for a, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks))
                       if m or not trainable_only)

        self.config = model_config
        self.decoder = (count("decoder"), count("decoder", True))
        head = abstract_params.get("decoder", {}).get("lm_head", {})
        head_mask = trainable_mask.get("decoder", {}).get("lm_head", {})
        self.head = (sum(int(np.prod(a.shape)) for a in jax.tree.leaves(head)),
                     sum(int(np.prod(a.shape)) for a, m in zip(jax.tree.leaves(head), jax.tree.leaves(head_mask)) if m))
        vision = ("vit", "adapter")
        self.vision = (sum(count(p) for p in vision), sum(count(p, True) for p in vision))

    def per_step(self, tokens: int, context: int, patches: int, predicting: int | None = None) -> float:
        """`predicting`: the real positions that predict a token (None: all `tokens`)."""
        d, v = self.config.decoder, self.config.vision
        flops = (4 * self.decoder[0] + 2 * self.decoder[1]) * tokens
        if predicting is not None:  # the head's work where nothing is predicted is not done
            flops -= (4 * self.head[0] + 2 * self.head[1]) * (tokens - predicting)
        flops += 12 * d.num_layers * d.hidden_size * context * tokens
        if v is not None and patches:
            side = v.features_per_image()
            flops += (4 * self.vision[0] + 2 * self.vision[1]) * patches
            flops += 12 * v.num_layers * v.hidden_size * side * patches
        return float(flops)


def predicting_positions(batch) -> int:
    """The positions whose next token is a label of the same sample: where the LM head and the loss
    run (`models.loss`: position t predicts the label at t + 1)."""
    seg, labels = batch["segment_ids"], batch["labels"]
    return int(((labels[:, 1:] >= 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).sum())


def sum_over_processes(*values: float) -> tuple[float, ...]:
    """`values` summed over every process (a collective: all of them call it at the same step)."""
    if jax.process_count() == 1:
        return tuple(float(v) for v in values)
    from jax.experimental import multihost_utils

    # float32 (JAX's default width): counts of ~1e8 a window keep 7 significant digits
    gathered = multihost_utils.process_allgather(np.asarray(values, np.float32))
    return tuple(float(v) for v in np.asarray(gathered, np.float64).sum(axis=0))


def _weighted_by(key: str, metrics: dict) -> str | None:
    """The count a window averages a metric by, if not by steps: the split losses by their token
    counts (stage I has no generation tokens); with accumulation, grad_norm by the updates it was
    taken at (train/step.py: the micro-batches between hold partial means)."""
    if key.startswith("ce_"):
        return "tokens_" + key[3:]
    if key == "grad_norm" and "updates" in metrics:
        return "updates"
    return None


class Window:
    """Sums a logging window's batches and device metrics; `flush` averages and resets."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.metrics, self.tokens, self.positions, self.steps, self.flop_inputs = [], 0, 0, 0, []
        self.start = time.time()

    def add_batch(self, batch, features_per_tile: int):
        real = batch["segment_ids"] > 0
        tokens = int(real.sum())
        # mean attended context per real token: positions are 0.. inside each sample
        context = float(batch["positions"][real].mean() + 1) if tokens else 0.0
        tiles = int(np.any(batch["pixels"] != 0, axis=(1, 2, 3)).sum())
        self.tokens += tokens
        self.positions += real.size
        self.flop_inputs.append((tokens, context, tiles * features_per_tile, predicting_positions(batch)))

    def add_metrics(self, metrics):
        self.metrics.append(metrics)
        self.steps += 1

    def state(self) -> dict:
        """What the window has summed since its last flush, for a checkpoint (JSON): a run stopped
        between two logging steps and resumed logs the same window as a run that went on."""
        return {"metrics": [{k: float(v) for k, v in m.items()} for m in jax.device_get(self.metrics)],
                "tokens": self.tokens, "positions": self.positions, "steps": self.steps,
                "flop_inputs": [list(x) for x in self.flop_inputs], "seconds": time.time() - self.start}

    def restore(self, state: dict) -> None:
        """Takes up a window `state` gave (its seconds count toward the rate: they were training)."""
        self.metrics, self.steps = list(state["metrics"]), int(state["steps"])
        self.tokens, self.positions = int(state["tokens"]), int(state["positions"])
        self.flop_inputs = [tuple(x) for x in state["flop_inputs"]]
        self.start = time.time() - float(state["seconds"])

    def exclude(self, seconds: float) -> None:
        """Leaves time spent on something other than training (an evaluation) out of tokens/s and MFU."""
        self.start += seconds

    def flush(self, step: int, flops: FlopCounter, devices: int, total: int | None = None) -> dict:
        """The window's averages (also logged: with `total`, the steps to go and the time they will
        take at this window's rate)."""
        fetched = jax.device_get(self.metrics)
        seconds = max(time.time() - self.start, 1e-9)
        out = {}
        for k in fetched[0]:
            values = np.array([float(m[k]) for m in fetched])
            if k in ("nonfinite_in_a_row", "learning_rate"):  # as at the window's last step
                out[k] = float(values[-1])
            elif k.startswith("tokens") or k in ("skipped", "updates"):
                out[k] = float(values.sum())
            elif (by := _weighted_by(k, fetched[0])) is not None:
                # nothing counted: not logged; a value counted 0 (a skipped micro-batch's NaN) stays out
                count = np.array([float(m[by]) for m in fetched])
                if "skipped" in fetched[0]:  # (a skipped step's tokens were counted, its loss is NaN)
                    count = np.where(np.array([float(m["skipped"]) for m in fetched]) == 0, count, 0.0)
                if count.sum():
                    out[k] = float(np.where(count > 0, values * count, 0.0).sum() / count.sum())
            else:
                # a skipped (non-finite) step's loss is NaN: averaged over the steps that counted
                # (all of them if none did, so a window of skipped steps still shows it)
                kept = np.array([float(m["skipped"]) == 0 for m in fetched]) if "skipped" in fetched[0] else None
                out[k] = float(values[kept].mean() if kept is not None and kept.any() else values.mean())
        # each process counted its own rows: on a pod the window's figures are the sums over processes
        tokens, positions, work = sum_over_processes(
            self.tokens, self.positions, sum(flops.per_step(*x) for x in self.flop_inputs))
        out["real_tokens"] = tokens
        out["tokens_per_second"] = tokens / seconds
        out["real_fraction"] = tokens / max(positions, 1)  # of the batches' positions, not padding
        peak = peak_flops()
        if peak is not None:
            out["mfu"] = work / seconds / (peak * devices)
        out["step"] = step
        # ("tokens", the loss's count, are the predicted ones, not the real_tokens tokens/s counts)
        shown = " ".join(f"{'predicted' if k == 'tokens' else k}={v:.4g}" for k, v in out.items()
                         if k not in ("step",) and not k.startswith("tokens_"))
        progress = ""
        if total:
            left = (total - step) * seconds / max(self.steps, 1)
            progress = f"/{total} ({100 * step / total:.0f}%, {datetime.timedelta(seconds=round(left))} left)"
        log.info("step %d%s: %s tokens/s=%.1f", step, progress, shown, out["tokens_per_second"])
        self._reset()
        return out


class MetricWriter:
    """Scalars, pictures and texts as TensorBoard summaries, in the formats `tf.summary.scalar`,
    `tf.summary.image` and `tf.summary.text` write (built from `tensorboard`'s own protos)."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.writer = None
        if enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            os.makedirs(logdir, exist_ok=True)
            self.writer = EventFileWriter(logdir)

    def _add(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                              summary=summary_pb2.Summary(value=values)))
        self.writer.flush()

    def write(self, step: int, scalars: dict) -> None:
        if self.writer is None:
            return
        from tensorboard.compat.proto import summary_pb2

        self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                         for k, v in scalars.items() if k != "step"])

    def write_images(self, step: int, images: dict[str, tuple[list, str]]) -> None:
        """`images`: tag -> (PIL pictures of one size, a description shown beside them)."""
        if self.writer is None or not images:
            return
        import io

        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.image import metadata as image_metadata
        from tensorboard.util import tensor_util

        values = []
        for tag, (pictures, description) in images.items():
            encoded = []
            for picture in pictures:
                buffer = io.BytesIO()
                picture.convert("RGB").save(buffer, format="PNG")
                encoded.append(buffer.getvalue())
            width, height = pictures[0].size
            # the image plugin's tensor: [width, height, png, png, ...] as strings
            tensor = tensor_util.make_tensor_proto([str(width).encode(), str(height).encode(), *encoded],
                                                   dtype=np.object_)
            values.append(summary_pb2.Summary.Value(
                tag=tag, tensor=tensor,
                metadata=image_metadata.create_summary_metadata(display_name=tag, description=description)))
        self._add(step, values)

    def write_texts(self, step: int, texts: dict[str, str]) -> None:
        """`texts`: tag -> Markdown text."""
        if self.writer is None or not texts:
            return
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._add(step, [value for tag, text in texts.items() for value in text_pb(tag, text).value])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
