"""Evaluation during training (`config.eval`), run by the loop every `eval.every` steps and at the
last step, after the step's metrics and before its checkpoint:

    eval/loss, eval/ce, eval/z_loss     the loss on `eval.batches` held-out batches (token-weighted)
    eval/ce_understanding               ... on the text targets (of every sample: a generation
                                        sample's closing tokens too; `models.loss`)
    eval/ce_generation                  ... on the picture codes
    eval/tokens                         the predicted tokens those averages cover
    eval/pictures/<i>                   the picture drawn for `eval.prompts[i]` (an image summary)
    eval/answers/<i>                    the answer to `eval.questions[i]` (a text summary)
    WORKDIR/samples/step_<N>.png        the pictures of step N side by side, each prompt beneath

The held-out batches are read once, before the first step, and kept: every evaluation measures
the same samples, and the records the held-out filter passes over are not read again. Their loss
is the train step's forward pass (same model, same shardings, `fused_lm_loss`), without dropout
and without gradients. The prompts and questions are encoded once too, and the decode loop is
compiled once: each evaluation only hands it the current parameters.

Nothing here changes the train state or reads the training data, so a run trains the same with
evaluation as without, and resumes bit for bit.
"""

from __future__ import annotations

import logging
import os
import textwrap
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image, ImageDraw

from unitoken_jax.inference.pipeline import UniTokenPipeline
from unitoken_jax.model import UniTokenModel
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.models.loss import fused_lm_loss
from unitoken_jax.models.unitoken import UniToken, run_layout
from unitoken_jax.tokenizer import images as image_io
from unitoken_jax.train.config import EvalConfig
from unitoken_jax.train.program import batch_shards
from unitoken_jax.train.step import head_kernel

log = logging.getLogger(__name__)

# WORKDIR/samples/step_N.png: pictures scaled up (NEAREST) to at least this side, GAP apart, each
# with CAPTION_LINES lines of its prompt in a band CAPTION_HEIGHT high beneath it
MIN_SIDE = 128
GAP = 4
CAPTION_LINES = 3
CAPTION_HEIGHT = 40


def make_eval_loss(config: UniTokenConfig, feature_blocks: int = 1):
    """`eval_loss(params, batch) -> metrics` of `fused_lm_loss`: the train step's loss (a LoRA head's
    adapter folded in as there), deterministic; `feature_blocks` as the train step's; `params` in
    the scanned layout, as the train state holds them."""
    module = UniToken(config)

    def eval_loss(params, batch):
        hidden, _ = module.apply({"params": run_layout(params, config)}, batch["tokens"], batch["positions"],
                                 batch["segment_ids"], batch.get("is_continuous"), batch.get("feature_index"),
                                 batch.get("pixels"), deterministic=True, return_hidden=True,
                                 feature_blocks=feature_blocks)
        _, metrics = fused_lm_loss(hidden, head_kernel(params["decoder"]["lm_head"], config), batch["labels"],
                                   batch["segment_ids"], config.z_loss_weight, batch.get("generation"),
                                   chunk=config.loss_chunk, dtype=config.dtype, kernel_grad=False)
        return metrics

    return eval_loss


def average_losses(per_batch: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The batches' metrics weighted by their token counts; a kind without tokens is left out
    (stage I's captions have no generation targets)."""
    batches = [{k: float(v) for k, v in m.items()} for m in per_batch]
    tokens = sum(m["tokens"] for m in batches)
    out = {}
    for name, count in (("loss", "tokens"), ("ce", "tokens"), ("z_loss", "tokens"),
                        ("ce_understanding", "tokens_understanding"), ("ce_generation", "tokens_generation")):
        n = sum(m[count] for m in batches)
        if n:
            out[f"eval/{name}"] = sum(m[name] * m[count] for m in batches) / n
    out["eval/tokens"] = float(tokens)
    return out


def tokenizers(config: EvalConfig):
    """(text tokenizer, VQ tokenizer) named by `eval.tokenizer` / `eval.vqgan`."""
    if config.tokenizer == "demo":
        from unitoken_jax.data.demo import demo_tokenizers

        return demo_tokenizers()
    from unitoken_jax.tokenizer.text import TextTokenizer
    from unitoken_jax.vq_tokenizer import VQTokenizer

    return TextTokenizer.from_file(config.tokenizer), VQTokenizer.load(config.vqgan)


class Samples:
    """The prompts and questions of `eval`, encoded once as decode requests laid out as the
    training data is (its VQ crop size, SigLIP tiles, no image prefix before a picture: the
    pre-tokenizer writes none), and the compiled decode loop that runs them."""

    def __init__(self, config: EvalConfig, model_config: UniTokenConfig, abstract_params, mesh, image_settings):
        self.config = config
        text, vq = tokenizers(config)
        model = UniTokenModel(model_config, abstract_params)  # shapes only: every run gets the current parameters
        model.mesh = mesh
        s = image_settings
        self.pipeline = UniTokenPipeline(model, text, vq, anyres=s.anyres, vq_size=s.vq_size,
                                         siglip_size=s.siglip_size, image_prefix=(), continuous=s.continuous,
                                         anyres_pinpoints=s.pinpoints(),
                                         **({"generate_template": config.template} if config.template else {}))
        size = (config.size, config.size)
        try:
            self.requests = [self.pipeline.generate_request(p, size=size, cfg=config.cfg, seed=config.seed + i)
                             for i, p in enumerate(config.prompts)]
            self.requests += [self.pipeline.understand_request([path] if path else [], question,
                                                               max_new_tokens=config.max_new_tokens)
                              for path, question in config.questions]
        except (ValueError, OSError) as e:
            raise ValueError(f"eval.prompts / eval.questions: {e}") from e

    def run(self, params) -> tuple[list[Image.Image], list[str]]:
        """(one picture per prompt, one answer per question) from the model with `params`."""
        self.pipeline.decode_loop.params = params
        results = self.pipeline.run(self.requests)
        n = len(self.config.prompts)
        pictures = []
        for prompt, parts in zip(self.config.prompts, results[:n]):
            drawn = [p for p in parts if isinstance(p, Image.Image)]
            if not drawn:  # the grid rules force a whole picture; kept from crashing a run all the same
                log.warning("eval: the prompt %r gave no picture (%r)", prompt, parts)
                drawn = [Image.new("RGB", (self.config.size, self.config.size), (128, 128, 128))]
            pictures.append(drawn[0].convert("RGB"))
        answers = ["".join(p for p in parts if isinstance(p, str)) for parts in results[n:]]
        return pictures, answers


def captioned_grid(pictures: Sequence[Image.Image], captions: Sequence[str]) -> Image.Image:
    """The pictures in one row, each scaled to one side (at least MIN_SIDE) with its caption beneath."""
    side = max(MIN_SIDE, *(max(p.size) for p in pictures))
    grid = Image.new("RGB", (len(pictures) * (side + GAP) - GAP, side + CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (picture, caption) in enumerate(zip(pictures, captions)):
        x = i * (side + GAP)
        grid.paste(picture.convert("RGB").resize((side, side), Image.NEAREST), (x, 0))
        lines = textwrap.wrap(caption, width=max(8, side // 7))[:CAPTION_LINES]
        draw.multiline_text((x + 2, side + 2), "\n".join(lines), fill=(0, 0, 0), spacing=1,
                            font=image_io.label_font(11))
    return grid


class Evaluator:
    """Runs `eval` on the current parameters; see the module docstring."""

    def __init__(self, config: EvalConfig, model_config: UniTokenConfig, batches: list[dict], params_sharding,
                 batch_shardings, mesh, workdir: str, samples: Samples | None):
        self.config = config
        self.batches = batches
        self.samples = samples
        self.samples_dir = os.path.join(workdir, "samples")
        replicated = NamedSharding(mesh, PartitionSpec())
        self.loss = jax.jit(make_eval_loss(model_config, batch_shards(mesh)),
                            in_shardings=(params_sharding, batch_shardings), out_shardings=replicated)

    def due(self, step: int, total: int) -> bool:
        return self.config.every > 0 and (step % self.config.every == 0 or step == total)

    def run(self, step: int, params, writer) -> dict[str, float]:
        """Losses to TensorBoard (and returned); pictures and answers to TensorBoard and the samples
        directory (process 0 writes; every process computes)."""
        metrics = average_losses(jax.device_get([self.loss(params, batch) for batch in self.batches]))
        log.info("eval at step %d: %s", step, " ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in metrics.items()))
        writer.write(step, metrics)
        if self.samples is not None:
            pictures, answers = self.samples.run(params)
            c = self.config
            writer.write_images(step, {f"eval/pictures/{i}": ([p], prompt)
                                       for i, (p, prompt) in enumerate(zip(pictures, c.prompts))})
            writer.write_texts(step, {f"eval/answers/{i}": _answer_markdown(path, question, answer)
                                      for i, ((path, question), answer) in enumerate(zip(c.questions, answers))})
            for (_, question), answer in zip(c.questions, answers):
                log.info("eval at step %d: %r -> %r", step, question, answer)
            if pictures and jax.process_index() == 0:
                os.makedirs(self.samples_dir, exist_ok=True)
                path = os.path.join(self.samples_dir, f"step_{step}.png")
                captioned_grid(pictures, c.prompts).save(path)
                log.info("eval at step %d: pictures in %s", step, path)
        return metrics


def _answer_markdown(picture: str, question: str, answer: str) -> str:
    about = f"**picture** `{picture}`  \n" if picture else ""
    return f"{about}**question** {question}  \n**answer** {answer}"
