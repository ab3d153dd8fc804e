"""Plant known bugs, one at a time, in a scratch copy of the repository and check that the tests
catch each one (run on demand, not by pytest: the file name does not start with `test_`).

    python tests/mutations.py                 # all, a table at the end
    python tests/mutations.py --only cfg_sign # one

Each mutation replaces one exact piece of source (it must occur exactly once, so a refactoring
that moves the code makes the script say so instead of planting nothing) and runs the tests that
should notice. "caught" means pytest failed; a mutation that passes is a hole in the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments


MUTATIONS = (
    Mutation("vit_scale_ignored", "the ViT learning-rate scale ignored", "unitoken_jax/train/optimizer.py",
             "lambda step: schedule(step) * scale", "lambda step: schedule(step)",
             ("tests/test_train_step.py", "-k", "vit or optimizer")),
    Mutation("accumulation_sums", "accumulation summing instead of averaging", "unitoken_jax/train/optimizer.py",
             "optax.MultiSteps(update, every_k_schedule=config.accumulation_steps)",
             "optax.MultiSteps(update, every_k_schedule=config.accumulation_steps, use_grad_mean=False)",
             ("tests/test_train_step.py", "-k", "optimizer or accumulating")),
    Mutation("top_p_one_too_few", "top-p keeping one token too few (not the one that reaches p)",
             "unitoken_jax/inference/sampling.py",
             "return keep & ((keys > t[:, None]) | everything[:, None])",
             "return keep & ((keys > t[:, None] + 1) | everything[:, None])",
             ("tests/test_sampling.py",)),
    Mutation("image_temperature_for_text", "the image temperature used for text", "unitoken_jax/inference/decode.py",
             "temp = jnp.where(in_img, q.image_temperature, q.temperature)", "temp = q.image_temperature",
             ("tests/test_inference.py", "-k", "greedy or understand_answers")),
    Mutation("cfg_sign", "the CFG sign swapped", "unitoken_jax/inference/sampling.py",
             "guided = partner + scale_R[:, None] * (cond - partner)",
             "guided = partner - scale_R[:, None] * (cond - partner)",
             ("tests/test_sampling.py", "tests/test_inference.py", "-k", "classifier or cfg")),
    Mutation("uncond_one_late", "the unconditional context started one token late", "unitoken_jax/inference/pipeline.py",
             'uncond = np.concatenate([neg_tokens, ',
             'uncond = np.concatenate([neg_tokens[1:], ',
             ("tests/test_inference.py", "-k", "unconditional or cfg")),
    Mutation("decode_position", "the decode position off by one", "unitoken_jax/inference/decode.py",
             "positions = (p.prompt_len + n_out - 1)[:, None]", "positions = (p.prompt_len + n_out)[:, None]",
             ("tests/test_inference.py", "-k", "greedy or cfg or understand_answers")),
    Mutation("unpad_row", "the AnyRes unpad off by one row", "unitoken_jax/tokenizer/anyres.py",
             "return slice(pad, rows - pad), slice(0, cols)", "return slice(pad + 1, rows - pad + 1), slice(0, cols)",
             ("tests/test_images.py", "-k", "unpad")),
    Mutation("sep_unlabelled", "SEP left unlabelled", "unitoken_jax/tokenizer/conversation.py",
             "labels.append(layout.SEP)", "labels.append(-100)",
             ("tests/test_tokenizer.py",)),
    Mutation("z_loss_unshifted", "the z-loss on unshifted positions", "unitoken_jax/models/loss.py",
             "z_loss, _ = masked_mean(jnp.square(lse), valid)",
             "z_loss, _ = masked_mean(jnp.square(lse), labels_BL[:, :-1] >= 0)",
             ("tests/test_unitoken_parity.py",)),
    Mutation("int8_truncates", "int8 rounding toward zero", "unitoken_jax/models/layers.py",
             "xp.clip(xp.round(w * (xp.float32(127.0) / amax))", "xp.clip(xp.trunc(w * (xp.float32(127.0) / amax))",
             ("tests/test_quantize.py",)),
    Mutation("int8_scale_unapplied", "the int8 scale of the LM head left out", "unitoken_jax/models/layers.py",
             "kernel, scale = kernel[..., :stop], (scale[..., :stop] if int8 else None)",
             "kernel, scale = kernel[..., :stop], (scale[..., :1] if int8 else None)",
             ("tests/test_quantize.py",)),
    Mutation("prefill_cache_front", "the prefill's cache padded at the front", "unitoken_jax/models/chameleon.py",
             "pad = ((0, 0), (0, 0), (0, length - x_BTD.shape[1]), (0, 0))",
             "pad = ((0, 0), (0, 0), (length - x_BTD.shape[1], 0), (0, 0))",
             ("tests/test_inference.py", "-k", "greedy")),
    Mutation("fused_loss_no_z_grad", "the fused loss's gradient without the z-loss term", "unitoken_jax/models/loss.py",
             "((1 + 2 * z_loss_weight * lse) * w / count)", "((1 + 0 * z_loss_weight * lse) * w / count)",
             ("tests/test_fused_loss.py",)),
    Mutation("lookahead_restore_repacks", "a restore re-packing the groups already packed ahead",
             "unitoken_jax/data/pipeline.py", 'self._skip = set(state.get("packed_ahead", ()))', "self._skip = set()",
             ("tests/test_pipeline.py", "-k", "lookahead")),
    Mutation("flash_backward_no_delta", "the xla attention's backward without the softmax's row term",
             "unitoken_jax/models/attention.py", "ds = p * (dp - delta_i[..., None])", "ds = p * dp",
             ("tests/test_attention.py", "-k", "gradients")),
    Mutation("lora_scaling_alpha", "LoRA scaled by alpha instead of alpha / rank", "unitoken_jax/models/config.py",
             "return self.alpha / self.rank", "return self.alpha", ("tests/test_lora.py", "-k", "peft")),
    Mutation("peft_b_unflipped", "PEFT's lora_B written without its transpose (square factors slip through shape "
             "checks)", "unitoken_jax/convert/peft.py",
             "np.ascontiguousarray(b_l.reshape(lora.rank, -1).T)", "np.ascontiguousarray(b_l.reshape(-1, lora.rank))",
             ("tests/test_lora.py", "-k", "peft")),
    Mutation("lora_trains_the_base", "a LoRA run training the base weights too", "unitoken_jax/train/optimizer.py",
             'return "frozen" if not is_adapter(keys) else "vit" if keys[0] == "vit" else "train"',
             'return "vit" if keys[0] == "vit" else "train"',
             ("tests/test_lora_training.py", "-k", "alone")),
    Mutation("lora_vision_adapters_full_rate", "LoRA adapters on the SigLIP tower ignoring the ViT's rate scale",
             "unitoken_jax/train/optimizer.py",
             'return "frozen" if not is_adapter(keys) else "vit" if keys[0] == "vit" else "train"',
             'return "frozen" if not is_adapter(keys) else "train"',
             ("tests/test_train_step.py", "-k", "vision_adapters")),
    Mutation("holdout_ignored_by_training", "training reading the held-out samples", "unitoken_jax/data/pipeline.py",
             'return is_held_out(sample_id, self.holdout_fraction) == (self.split == "eval")',
             'return self.split != "eval" or is_held_out(sample_id, self.holdout_fraction)',
             ("tests/test_eval_in_training.py", "-k", "disjoint or never")),
    Mutation("api_key_only_on_models", "the API key checked on /v1/models alone", "unitoken_jax/serve/app.py",
             'if key and scope["path"] not in ("/health", "/"):', 'if key and scope["path"] == "/v1/models":',
             ("tests/test_serve.py", "-k", "key")),
    Mutation("head_groups_across_devices", "the fused head gathering positions across devices",
             "unitoken_jax/models/loss.py", "return shards if rows % shards == 0 else rows",
             "return 1", ("tests/test_fused_loss.py",)),
    Mutation("partner_never_waits", "a chat picture's unconditional row fed the answer's text",
             "unitoken_jax/inference/decode.py",
             "waiting = (p.primary != r) & ~jnp.take(grid.in_image(g), p.primary)",
             "waiting = (p.primary != r) & False", ("tests/test_slots.py", "-k", "chat")),
    Mutation("checker_reads_several_shapes", "the shapes world's checker reading a picture of several shapes as one",
             "unitoken_jax/world/shapes.py", "if int((sizes >= SPECK).sum()) != 1:",
             "if int((sizes >= SPECK).sum()) < 1:", ("tests/test_world.py", "-k", "checker")),
    Mutation("shutdown_closes_connections_first", "Ctrl-C closing the server's connections before its queue is told",
             "unitoken_jax/serve/app.py", "await run_in_threadpool(self.app_scheduler.stop, 0.0)", "pass",
             ("tests/test_serve.py", "-k", "told_to_exit")),
    Mutation("cudnn_any_head_size", "auto attention taking cuDNN for head sizes its kernel refuses",
             "unitoken_jax/models/attention.py", "if head_dim is not None and (head_dim % 8 or head_dim > most):",
             "if False:", ("tests/test_attention.py", "-k", "backend_choice")),
    Mutation("job_json_one_temporary", "the hosts of a pod writing job.json through one temporary file",
             "unitoken_jax/data/pretokenize.py", 'return f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"',
             'return path + ".tmp"', ("tests/test_pretokenize.py", "-k", "pod_writing")),
    Mutation("eval_put_off_for_good", "an evaluation a preemption put off never run",
             "unitoken_jax/train/loop.py", 'data_state["eval_pending"] = True', "pass",
             ("tests/test_eval_in_training.py", "-k", "preemptions_around")),
    Mutation("stale_final_kept", "a finished run resumed to go further keeping its old final/",
             "unitoken_jax/train/loop.py", "            _set_aside_stale_exports(workdir, start_step)",
             "            pass", ("tests/test_train_loop.py", "-k", "go_further")),
    Mutation("nested_text_config_ignored", "save_hf replacing only the top-level decoder fields of config.json",
             "unitoken_jax/convert/hf.py", '    if "text_config" in hf:\n        text = hf["text_config"]',
             '    if False:\n        text = hf["text_config"]', ("tests/test_checkpoint_io.py", "-k", "changed_decoder")),
    Mutation("sweep_config_json_rewritten", "a sweep rewriting a started run's config.json with an edited config",
             "unitoken_jax/sweep.py", "if os.path.exists(config_json) and _has_checkpoints(run.workdir):",
             "if False:", ("tests/test_sweep.py", "-k", "loops_record")),
    Mutation("skipped_step_in_split_losses", "a skipped step's NaN averaged into the window's split losses",
             "unitoken_jax/train/metrics.py",
             'count = np.where(np.array([float(m["skipped"]) for m in fetched]) == 0, count, 0.0)', "pass",
             ("tests/test_train_loop.py", "-k", "how_far")),
    Mutation("modalities_ignored", "modalities ['text'] still drawing pictures", "unitoken_jax/serve/app.py",
             "cfg_scale=call.guidance_scale, allow_images=call.allow_images)", "cfg_scale=call.guidance_scale)",
             ("tests/test_serve.py", "-k", "modalities_say")),
    Mutation("chat_picture_taken_apart", "chat(images=one picture) taking the picture apart",
             "unitoken_jax/inference/pipeline.py", '"image": _pictures(images)}', '"image": list(images)}',
             ("tests/test_default_model.py", "-k", "takes_what_users")),
    Mutation("partner_keeps_last_picture",
             "a chat answer's second picture guided by a partner that still sees the first",
             "unitoken_jax/inference/decode.py",
             'cache = {**s.cache, "index": jnp.where(restart, p.prompt_len, s.cache["index"])}',
             "cache = s.cache", ("tests/test_inference.py", "-k", "every_picture")),
    Mutation("growth_rounds_down", "a cache grown in fixed steps rounded down (too short for the chunk)",
             "unitoken_jax/inference/decode.py",
             "return [min(full, -(-(prompt + end) // growth) * growth) for end in ends]",
             "return [min(full, (prompt + end) // growth * growth) for end in ends]",
             ("tests/test_inference.py", "-k", "grows_as")),
    Mutation("out_extension_unchecked", "an --out PIL cannot write found only after drawing",
             "unitoken_jax/cli.py", "    kind = Image.registered_extensions().get(extension)\n", "    kind = \"PNG\"\n",
             ("tests/test_inference.py", "-k", "cli_verbs")),
    Mutation("accel_positions_run_on", "the accelerator benchmark's positions not restarting per sample",
             "benchmarks/train_accel.py", 'batch["positions"][b, start:end] = np.arange(end - start)',
             'batch["positions"][b, start:end] = np.arange(start, end)', ("tests/test_accel_scripts.py",)),
    Mutation("default_growth_rounds_down", "the default cache growth rounded down (a size more than doubling)",
             "unitoken_jax/inference/decode.py", "return -(-full // (sizes * GROWTH_ROUND)) * GROWTH_ROUND",
             "return full // (sizes * GROWTH_ROUND) * GROWTH_ROUND",
             ("tests/test_inference.py", "-k", "default_growth")),
    Mutation("cache_env_ignored", "$UNITOKEN_COMPILATION_CACHE not read (the tests' 'off' too)",
             "unitoken_jax/inference/compilation_cache.py", "path = os.environ.get(ENV)", "path = None",
             ("tests/test_compilation_cache.py",)),
    Mutation("cache_keeps_only_slow_compiles", "the CLI's cache keeping only JAX's default >= 1 s compiles",
             "unitoken_jax/inference/compilation_cache.py", "_MIN_COMPILE_SECONDS = 0.0", "_MIN_COMPILE_SECONDS = 1.0",
             ("tests/test_compilation_cache.py",)),
    Mutation("prompt_not_padded", "the prefill's width not padded to a multiple (every prompt length compiles)",
             "unitoken_jax/inference/decode.py", "return -(-longest_prompt // multiple) * multiple",
             "return longest_prompt", ("tests/test_inference.py", "-k", "prompts_a_few")),
    Mutation("rows_pass_the_last_position", "a row runs to max_new_tokens past the model's last position",
             "unitoken_jax/inference/decode.py", "min(r.max_new_tokens, (positions or math.inf) - r.longest_prompt)",
             "r.max_new_tokens", ("tests/test_inference.py", "-k", "last_position")),
    Mutation("cache_follows_the_prompt", "the cache sized by prompt + budget (each chat turn compiles its loop)",
             "unitoken_jax/inference/decode.py", "cache_len = min(width + max_new, max(width, positions))",
             "cache_len = width + max_new", ("tests/test_inference.py", "-k", "last_position")),
    Mutation("reuse_ignores_pictures", "a chat turn reusing the kept cache past a picture that changed under the same "
             "tokens", "unitoken_jax/inference/decode.py",
             "same &= ~cont | ((kept.feature_index[:n] == index) & identical[picture])",
             "same &= ~cont | (kept.feature_index[:n] == index)", ("tests/test_inference.py", "-k", "reuses_the_kept")),
    Mutation("reuse_padding_past_the_cache", "a reused turn's padding written past the cache's end (shifted back)",
             "unitoken_jax/inference/decode.py",
             "return next((s for s in (start, start - start % m) if s + prefill_width(max(n - s, least), m) <= length), 0)",
             "return start", ("tests/test_inference.py", "-k", "fills_the_model")),
    Mutation("next_turn_reads_another_slot", "a conversation's next turn extending another slot's kept cache",
             "unitoken_jax/inference/slots.py",
             "cache = _take_row(self.state.cache, jnp.int32(slot), jnp.int32(start))",
             "cache = _take_row(self.state.cache, jnp.int32((slot + 1) % self.n_slots), jnp.int32(start))",
             ("tests/test_slots.py", "-k", "next_turn")),
    Mutation("cut_picture_filled_silently", "a chat picture cut off by the budget completed without a word",
             "unitoken_jax/inference/pipeline.py", "for i, request, shape, changes, by_budget in repaired:",
             "for i, request, shape, changes, by_budget in repaired[:0]:",
             ("tests/test_inference.py", "-k", "cut_by_its_budget_is_completed")),
    Mutation("cut_answer_silent", "an answer stopped by its budget or the model's end without a word",
             "unitoken_jax/inference/pipeline.py", "        if cut:\n", "        if cut and False:\n",
             ("tests/test_inference.py", "-k", "cut_by_its_budget or cli_verbs")),
    Mutation("chat_cache_sized_by_budget", "a chat turn's cache on scanned layers sized by prompt + budget again",
             "unitoken_jax/inference/decode.py",
             "if reuse_cache and self.layers != \"unrolled\":", "if False:",
             ("tests/test_inference.py", "-k", "doubling")),
    Mutation("batches_renumber_answers", "answers of a later batch streamed under their number in the batch",
             "unitoken_jax/inference/pipeline.py", "stream(first + i, new)", "stream(i, new)",
             ("tests/test_inference.py", "-k", "batch_size")),
    Mutation("prompt_padding_attended", "the prefill's padding attended to (segment 1 where no prompt is)",
             "unitoken_jax/inference/decode.py", "tokens[b, :len(toks)], segments[b, :len(toks)] = toks, 1",
             "tokens[b, :len(toks)], segments[b, :] = toks, 1", ("tests/test_inference.py", "-k", "prompts_a_few")),
    Mutation("cli_mesh_not_used", "the CLI's --mesh chosen and logged, but the model loaded on one device",
             "unitoken_jax/cli.py", "return dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, quantize=quantize)",
             "return dict(dtype=dtype, param_dtype=param_dtype, mesh=None, quantize=quantize)",
             ("tests/test_default_model.py", "-k", "mesh")),
    Mutation("splash_on_old_tpus", "auto attention taking the splash kernel on TPU v2 / v3 (Pallas lacks them)",
             "unitoken_jax/models/attention.py", '_NO_PALLAS_TPUS = ("TPU v2", "TPU v3")',
             '_NO_PALLAS_TPUS = ("TPU v1",)',
             ("tests/test_attention.py", "tests/test_aot.py", "-k", "choice or pallas")),
    Mutation("decode_mesh_fsdp_only", "a host's chips split over fsdp alone for decoding (every step gathers weights)",
             "unitoken_jax/inference/fit.py", "tensor = math.gcd(n, *heads)", "tensor = 1",
             ("tests/test_aot.py", "-k", "pallas")),
    Mutation("cli_float32_on_accelerators", "the CLI holding the weights in float32 on a TPU or GPU again",
             "unitoken_jax/model.py", 'return "float32" if platform == "cpu" else "bfloat16"', 'return "float32"',
             ("tests/test_default_model.py", "-k", "mesh")),
    Mutation("quantize_auto_plans_one_picture", "--quantize auto planning for one picture whatever --n asks",
             "unitoken_jax/cli.py", "n = args.batch_size or (16 if args.prompts_file else args.n)", "n = 1",
             ("tests/test_fit.py", "-k", "quantizes_by_itself")),
    Mutation("quantize_auto_forgets_the_input_picture", "--quantize auto planning an answer or an edit without the "
             "pictures its prompt holds", "unitoken_jax/cli.py", "picture = picture_prompt_length(config, "
             "getattr(args, \"vq_size\", None) or 512, ", "picture = 0 + (",
             ("tests/test_fit.py", "-k", "quantizes_by_itself")),
    Mutation("programs_per_loop", "each decode loop compiling its own programs again (a second model of the same config)",
             "unitoken_jax/inference/decode.py",
             "return _steps(config, self.layers, self.cache_dtype, self._ok_ids.tobytes(), ",
             "return _Steps(config, self.layers, self.cache_dtype, self._ok_ids, ",
             ("tests/test_inference.py", "-k", "second_model")),
    Mutation("quantize_auto_plans_one_tile", "--quantize auto planning one SigLIP tile a picture under --anyres",
             "unitoken_jax/cli.py", 'or 512, getattr(args, "anyres", False))', "or 512, False)",
             ("tests/test_fit.py", "-k", "quantizes_by_itself")),
    Mutation("train_cache_off_by_default", "training with no compilation cache unless its config names one (a "
             "sweep's runs each compiling their step)", "unitoken_jax/train/__main__.py",
             '_CONFIG.value.get("compilation_cache") or None', '_CONFIG.value.get("compilation_cache") or "off"',
             ("tests/test_sweep.py", "-k", "tiny_stage2")),
    Mutation("decode_benchmark_stale_stub", "the CPU decode benchmark's doubling stand-in without the `full` argument "
             "DecodeLoop._capacities gained (how it broke on 2026-12-01)", "benchmarks/decode.py",
             "def doubling(prompt, max_new, chunk, full=None):", "def doubling(prompt, max_new, chunk):",
             ("tests/test_accel_scripts.py", "-k", "cpu_decode")),
    Mutation("grad_norm_of_the_micro_batch", "with accumulation, grad_norm the last micro-batch's, not the averaged "
             "gradient's that is clipped", "unitoken_jax/train/step.py",
             '"grad_norm": optax.tree.norm(mean),', '"grad_norm": optax.tree.norm(grads),',
             ("tests/test_train_step.py", "-k", "accumulating")),
    Mutation("update_selected_not_conditional", "the optimizer update computed and then selected against the old "
             "state (XLA copies every moment a step)", "unitoken_jax/train/step.py",
             "jax.lax.cond(ok, apply_update, _unchanged, state.params, state.opt_state, grads)",
             "jax.tree.map(lambda a, b: jnp.where(ok, a, b), apply_update(state.params, state.opt_state, grads), "
             "(state.params, state.opt_state))",
             ("tests/test_train_step.py", "-k", "without_copying or non_finite")),
    Mutation("non_finite_step_applied", "a non-finite step's update applied anyway",
             "unitoken_jax/train/step.py", "jax.lax.cond(ok, apply_update, _unchanged,",
             "jax.lax.cond(ok, apply_update, apply_update,", ("tests/test_train_step.py", "-k", "non_finite")),
    Mutation("rope_once_a_layer", "RoPE's sine and cosine evaluated in every layer again",
             "unitoken_jax/models/layers.py", "    cos, sin = (t[:, :, None, :].astype(x_BTNH.dtype) for t in tables)",
             "    cos, sin = (jnp.cos(jnp.arcsin(jnp.sin(t)))[:, :, None, :].astype(x_BTNH.dtype) for t in tables)",
             ("tests/test_scan_remat_mesh.py", "-k", "rope")),
    Mutation("window_grad_norm_nan", "a skipped micro-batch's NaN norm making the window's grad_norm NaN",
             "unitoken_jax/train/metrics.py", "np.where(count > 0, values * count, 0.0).sum()", "(values * count).sum()",
             ("tests/test_train_loop.py", "-k", "how_far")),
    Mutation("worker_count_not_checked", "a resume with another data.worker_count let through to Grain",
             "unitoken_jax/train/loop.py", "if saved_count is not None and saved_count != worker_count:", "if False:",
             ("tests/test_pipeline.py", "-k", "worker_count")),
    Mutation("sigterm_ignored", "SIGTERM caught but not acted on (the run neither saves nor stops early)",
             "unitoken_jax/train/loop.py", "    def _handle(self, *_):\n        self.flag = True",
             "    def _handle(self, *_):\n        pass", ("tests/test_train_loop.py", "-k", "sigterm")),
    Mutation("blocks_share_the_features", "a packed row's pictures not kept in its own block's tiles (the blocked "
             "gather would read another shard's features)", "unitoken_jax/data/packing.py",
             "first = block * (self.block_capacity or 0) + self.block_features[block]",
             "first = sum(self.block_features)", ("tests/test_packing.py", "tests/test_pipeline.py", "-k", "block")),
    Mutation("blocked_gather_global_index", "the blocked feature gather reading global indices as local ones",
             "unitoken_jax/models/unitoken.py",
             "feature_index_BL.reshape(s, b // s, length) - (jnp.arange(s) * (f // s))[:, None, None]",
             "feature_index_BL.reshape(s, b // s, length)", ("tests/test_scan_remat_mesh.py", "-k", "blocked")),
    Mutation("loop_packs_without_blocks", "the training loop packing without the blocks its step gathers by",
             "unitoken_jax/train/loop.py", "blocks=shards // math.gcd(shards, n),", "blocks=1,",
             ("tests/test_train_loop.py", "-k", "blocks_that_stay")),
    Mutation("samples_log_process0_only", "a pod's sample ids recorded by process 0 alone",
             "unitoken_jax/train/loop.py", "_SamplesLog(workdir, start_step, enabled=config.log_sample_ids)",
             "_SamplesLog(workdir, start_step, enabled=primary and config.log_sample_ids)",
             ("tests/test_train_loop.py", "-k", "gloo")),
    Mutation("unblocked_batch_accepted", "a batch whose rows read another block's features accepted by the loop",
             "unitoken_jax/train/loop.py", "    if outside.any():", "    if False:",
             ("tests/test_train_loop.py", "-k", "refused")),
    Mutation("blocks_first_fit_only", "a group placed in its own order only (no second try, most features first)",
             "unitoken_jax/data/packing.py", "if placed is None and self.blocks > 1 and len(samples) > 1:",
             "if False:", ("tests/test_packing.py",)),
    Mutation("packing_first_fit", "a sample placed in the first row with room, not the fullest",
             "unitoken_jax/data/packing.py", "if most < fill[r] <= self.length - len(sample) and (",
             "if most < 0 <= self.length - len(sample) - fill[r] and (", ("tests/test_packing.py",)),
    Mutation("packing_in_order", "a batch taking the oldest group that fits, not the one stranding least room",
             "unitoken_jax/data/pipeline.py", "            if i == 0 and left == before:",
             "            if True:", ("tests/test_pipeline.py", "-k", "lookahead")),
    Mutation("packing_oldest_not_first", "a batch not started with the oldest waiting group (it may wait for ever)",
             "unitoken_jax/data/pipeline.py", "        if packer.empty:  # every batch starts with the oldest",
             "        if False:  # every batch starts with the oldest", ("tests/test_pipeline.py", "-k", "oldest")),
    Mutation("packing_window_uncapped", "the look-ahead window not held to half an epoch of a small dataset",
             "unitoken_jax/data/pipeline.py", "self.window = max(1, min(config.lookahead + 1, min(epochs) // 2))",
             "self.window = config.lookahead + 1", ("tests/test_pipeline.py",)),
    Mutation("fill_bound_one_more", "the whole-sample bound counting one sample more a row than fits",
             "unitoken_jax/data/packing.py", "    by_rows = per_row * mean / length",
             "    by_rows = (per_row + 1) * mean / length", ("tests/test_packing.py", "tests/test_pipeline.py", "-k",
                                                           "whole_sample")),
    Mutation("pod_restore_unagreed", "each process of a pod falls back from a damaged checkpoint on its own",
             "unitoken_jax/train/checkpoint.py", "failed = _processes_that_failed(reason is not None)",
             "failed = [0] if reason is not None else []", ("tests/test_train_loop.py", "-k", "gloo")),
    Mutation("pod_feature_offset_dropped", "a pod process's feature indices not offset to its pixels",
             "unitoken_jax/train/loop.py", 'local["feature_index"] + jax.process_index() * features_per_process, 0)',
             'local["feature_index"], 0)', ("tests/test_train_loop.py", "-k", "own_pictures")),
    Mutation("old_worker_count_unread", "an old data state's worker count not read from its shape",
             "unitoken_jax/train/loop.py", "return len(exhausted) if isinstance(exhausted, list) and exhausted else None",
             "return None", ("tests/test_pipeline.py", "-k", "worker_count")),
    Mutation("pod_preemption_unchecked", "a pod's processes not asking the preemption sync point each step",
             "unitoken_jax/train/loop.py", "self.flag = checkpointer.manager.reached_preemption(step)",
             "self.flag = self.flag", ("tests/test_train_loop.py", "-k", "one_process_of_a_pod")),
    Mutation("pod_eval_not_decoded", "a pod's evaluation draws no pictures and answers no questions (as before)",
             "unitoken_jax/train/loop.py", "               if e.decodes else None)",
             "               if e.decodes and jax.process_count() == 1 else None)",
             ("tests/test_train_loop.py", "-k", "two_processes_on_gloo")),
    Mutation("filled_blocks_overlap_twice", "a scanned step's ragged last cache block counting the slots it shares "
             "with the block before again", "unitoken_jax/models/layers.py",
             "        seen_BTS = seen_BTS & (start + jnp.arange(block) >= j * block)\n", "",
             ("tests/test_attention.py", "-k", "filled_cache_blocks")),
    Mutation("filled_blocks_nearest_row", "a scanned step reading the cache blocks up to the nearest row's slot, "
             "not the furthest", "unitoken_jax/models/chameleon.py",
             "limit = jnp.max(cache_index_B) + x_BTD.shape[1]", "limit = jnp.min(cache_index_B) + x_BTD.shape[1]",
             ("tests/test_inference.py", "-k", "scanned_and_unrolled")),
    Mutation("gpu_copy_fits_with_one_copy_free",
             "`auto` unrolling on a GPU with room for the copy but not for twice it",
             "unitoken_jax/inference/decode.py",
             'return 2 * nbytes <= stats["bytes_limit"] - stats.get("bytes_in_use", 0)',
             'return nbytes <= stats["bytes_limit"] - stats.get("bytes_in_use", 0)',
             ("tests/test_inference.py", "-k", "auto_unrolls_on_one_gpu")),
    Mutation("unrolled_training_swaps_layers", "an unrolled train step (`scan_layers=False`) running the first two "
             "decoder layers in each other's place", "unitoken_jax/train/step.py",
             '        hidden, _ = module.apply({"params": run_layout(params, config)},',
             "        params = run_layout(params, config)\n"
             "        d = params['decoder'] = dict(params['decoder'])\n"
             "        d['layers_0'], d['layers_1'] = d['layers_1'], d['layers_0']\n"
             '        hidden, _ = module.apply({"params": params},',
             ("tests/test_train_step.py", "-k", "unrolled")),
    Mutation("unrolled_eval_reads_scanned", "the in-training evaluation of an unrolled run (`scan_layers=False`) "
             "applying the state's scanned parameters as they are", "unitoken_jax/train/evaluate.py",
             'module.apply({"params": run_layout(params, config)}', 'module.apply({"params": params}',
             ("tests/test_eval_in_training.py", "-k", "unrolled")),
    Mutation("gather_sizes_an_empty_queue", "the serving worker sizing a batch of an emptied queue (a call dropped "
             "while it gathers) and dying", "unitoken_jax/serve/scheduler.py",
             "        while self._waiting and not self._stopping and time.monotonic() < end",
             "        while not self._stopping and time.monotonic() < end",
             ("tests/test_serve.py", "-k", "gathers")),
    Mutation("repair_fills_the_lowest_code_id", "a picture cut before its first code filled with the lowest code id "
             "(no code of a small VQ-GAN)", "unitoken_jax/tokenizer/layout.py",
             "filler = seen[-1] if seen else (filler_id if filler_id is not None else lo)",
             "filler = seen[-1] if seen else lo",
             ("tests/test_serve.py", "-k", "cut_after_its_size and static")),
    Mutation("run_raises_on_a_cut_picture", "`pipe.run` raising on a cut picture and losing the batch's answers",
             "unitoken_jax/inference/pipeline.py",
             "    def run(self, requests: Sequence[Request], *, progress: bool = False, repair: bool = True,",
             "    def run(self, requests: Sequence[Request], *, progress: bool = False, repair: bool = False,",
             ("tests/test_inference.py", "-k", "cut_by_its_budget_is_completed")),
    Mutation("llava_image_as_text", "LLaVA's `<image>` in a training item written as plain text, not the tokenizer's "
             "own token", "unitoken_jax/data/pretokenize.py",
             "max_length=self.settings.max_length,\n                                          llava_image=True)",
             "max_length=self.settings.max_length,\n                                          llava_image=False)",
             ("tests/test_pretokenize.py", "-k", "llava")),
    Mutation("release_prompt_names_the_size", "a released model asked for a picture with Lumina-mGPT's size-naming "
             "prompt, not the reference's own", "unitoken_jax/inference/pipeline.py",
             'GENERATE_TEMPLATE = "Generate an image according to the following prompt:\\n{prompt}"',
             'GENERATE_TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\\n{prompt}"',
             ("tests/test_inference.py", "-k", "cli_verbs")),
    Mutation("preempted_last_step_exports", "a run preempted at its last step exporting final/ (a sweep calls it "
             "finished; its last evaluation never runs)", "unitoken_jax/train/loop.py",
             "if step >= total and not preempted.flag:", "if step >= total:",
             ("tests/test_eval_in_training.py", "-k", "preemptions")),
    Mutation("pickle_subclass_unreadable", "a dict subclass in a torch pickle (Lightning's hyperparameters) making "
             "the file unreadable", "unitoken_jax/convert/torch_pickle.py",
             '    def __setitem__(self, key, value):\n        self.__dict__.setdefault("items", {})[key] = value\n', "",
             ("tests/test_vqgan.py", "-k", "subclasses")),
    Mutation("page_absolute_urls", "the web page calling /v1/... outside a proxy's path prefix",
             "unitoken_jax/serve/static/index.html",
             'location.pathname.slice(location.pathname.lastIndexOf("/") + 1) + "/") + "v1/";',
             'location.pathname.slice(location.pathname.lastIndexOf("/") + 1) + "/") + "/v1/";',
             ("tests/test_web_page.py", "-k", "prefix")),
    Mutation("slurm_keeps_a_time_limited_run_queued_out", "slurm not requeueing a run its time limit stopped before "
             "its stop_after", "launch/slurm_train.sbatch",
             "elif [[ $stop_after != 0 && -d $WORKDIR/checkpoints/$stop_after ]]; then",
             "elif [[ $stop_after != 0 ]]; then",
             ("tests/test_launch.py", "-k", "requeues")),
    Mutation("template_takes_a_literal_prompt", "a drawing template whose '{{prompt}}' is a literal taken (the prompt "
             "left out)", "unitoken_jax/inference/pipeline.py",
             'if "prompt" not in fields:', 'if "{prompt}" not in template:',
             ("tests/test_inference.py", "-k", "drawing_template")),
    Mutation("unconditional_attention_unmasked", "the xla attention's unconditional path (a batch that sees every "
             "block pair) without the segment mask off the diagonal", "unitoken_jax/models/attention.py",
             "            else:\n                carry = step(*operands)\n",
             "            else:\n                carry = step(*operands[:3], operands[3] if skip or j == i\n"
             "                             else jnp.ones_like(operands[3]))\n",
             ("tests/test_attention.py", "-k", "with_and_without_skipping")),
    Mutation("system_only_chat_refused", "a chat of system messages alone refused (OpenAI answers it)",
             "unitoken_jax/serve/wire.py", "    if not turns and system:", "    if False:",
             ("tests/test_serve.py", "-k", "message_orders")),
    Mutation("neutral_bool_is_its_number", "logprobs=0 taken as the neutral False (0 == False in Python)",
             "unitoken_jax/serve/wire.py",
             "if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral[name]):",
             "if value not in neutral[name]:", ("tests/test_serve.py", "-k", "neutral_field")),
    Mutation("stored_int8_planned_as_floats", "choose_quantize planning bfloat16 for a checkpoint stored as int8",
             "unitoken_jax/inference/fit.py", '        if config.quantize != "none" else None',
             "        if False else None", ("tests/test_fit.py", "-k", "int8_only")),
    Mutation("ctrl_c_through_the_teardown", "Ctrl-C during a compile left to the interpreter's teardown (exit 139)",
             "unitoken_jax/cli.py", "        if as_program:\n            exit_now(130)\n", "",
             ("tests/test_inference.py", "-k", "first_call_compiles")),
    Mutation("picture_option_internal_name", "a bad picture option refused as cfg_scale / image_temperature",
             "unitoken_jax/inference/pipeline.py", "            if e.option not in called:\n                raise\n",
             "            raise\n", ("tests/test_inference.py", "-k", "caller_gave")),
    Mutation("uneven_mesh_let_through", "an explicit --mesh that does not split the weights left to JAX's traceback",
             "unitoken_jax/cli.py", "        if uneven:\n", "        if False:\n",
             ("tests/test_default_model.py", "-k", "mesh_of_this_hosts")),
    Mutation("refused_resume_records_its_config", "a resume refused for its stop_after overwriting config.json",
             "unitoken_jax/train/loop.py", "    mesh = make_mesh(config.mesh)\n",
             "    mesh = make_mesh(config.mesh)\n    if jax.process_index() == 0:\n"
             "        record_config(workdir, config.to_dict())\n",
             ("tests/test_train_loop.py", "-k", "resumed_to_go_further")),
    Mutation("demo_beside_sources_silent", "the tiny configs' demo data trained beside a user's sources unsaid",
             "unitoken_jax/train/loop.py", "        if sources:  # (the tiny", "        if False:  # (the tiny",
             ("tests/test_train_loop.py", "-k", "demo_data_beside")),
    Mutation("restored_layout_unchecked", "a checkpoint restored in its own layout where it differs from the run's "
             "(the run fails at its first step)", "unitoken_jax/train/checkpoint.py",
             "        _check_layout(state, target)\n", "", ("tests/test_checkpointing.py", "-k", "optimizer_layout")),
    Mutation("train_call_exits_the_caller", "Ctrl-C in a training called from Python ending the caller's process",
             "unitoken_jax/train/__main__.py", "as_program = argv is None if as_program is None else as_program",
             "as_program = True", ("tests/test_train_loop.py", "-k", "called_from_python")),
    Mutation("stream_stops_at_an_unasked_end_of_turn", "a text stream ending at an end of turn the request did not "
             "stop at (stop_tokens=()): its answer's text after it never streamed",
             "unitoken_jax/tokenizer/conversation.py",
             "            if i == layout.IMAGE_START:\n",
             "            if i in (layout.IMAGE_START, layout.END_OF_TURN):\n",
             ("tests/test_serve.py", "-k", "text_stream_sends")),
    Mutation("every_pod_process_writes_the_sidecar", "every process of a pod writing a saved model's sidecar "
             "(one rename finds it gone; the pod hangs at the shutdown barrier)", "unitoken_jax/convert/orbax_io.py",
             "    if primary:\n        with open(", "    if True:\n        with open(",
             ("tests/test_checkpoint_io.py", "-k", "only_the_first_process")),
    Mutation("index_names_a_missing_tensor", "a sharded index naming a tensor no shard holds, loaded without it",
             "unitoken_jax/convert/files.py", "    if missing:\n        raise", "    if False:\n        raise",
             ("tests/test_checkpoint_io.py", "-k", "index_that_names")),
    Mutation("vq_checkpoint_extras_unsaid", "a Lightning VQ-GAN checkpoint's EMA weights skipped unsaid",
             "unitoken_jax/convert/vqgan.py", "    if other:\n        groups", "    if False:\n        groups",
             ("tests/test_vqgan.py", "-k", "beside_the_model")),
    Mutation("stored_int8_unchecked_by_auto", "--quantize auto loading a stored int8 checkpoint unchecked",
             "unitoken_jax/cli.py", '    if config.quantize == "none" and param_dtype != "bfloat16":',
             '    if config.quantize != "none" or param_dtype != "bfloat16":',
             ("tests/test_fit.py", "-k", "quantizes_by_itself")),
    Mutation("cache_planned_in_the_weights_dtype", "--quantize auto planning the KV cache in the weights' dtype, "
             "not the compute dtype", "unitoken_jax/inference/fit.py", "np.dtype(cache_dtype or dtype).itemsize",
             "np.dtype(dtype).itemsize", ("tests/test_fit.py", "-k", "quantizes_by_itself")),
    Mutation("int8_adapters_refused_after_reading", "adapters on a stored int8 checkpoint refused only after the "
             "whole model is read", "unitoken_jax/model.py", '    if adapters is not None and own.quantize != "none":',
             "    if False:", ("tests/test_quantize.py", "-k", "refused_before")),
    Mutation("random_int8_is_zeros", "a random int8 model with every kernel zero", "unitoken_jax/model.py",
             '        if config.quantize != "none":  # (an int8', "        if False:  # (an int8",
             ("tests/test_quantize.py", "-k", "random_int8")),
    Mutation("generate_index_written_once", "hosts sharing a folder: an index renamed last that listed fewer "
             "pictures than were drawn", "unitoken_jax/cli.py", "        if present == written:\n            break\n",
             "        if written is not None:\n            break\n",
             ("tests/test_default_model.py", "-k", "whoever_renames_last")),
    Mutation("pretokenize_job_overwritten", "two pretokenize hosts started at once with other settings both passing",
             "unitoken_jax/data/pretokenize.py", "        os.link(partial, path)\n        return True",
             "        os.replace(partial, path)\n        return True",
             ("tests/test_pretokenize.py", "-k", "other_settings_make_no")),
    Mutation("empty_lock_taken_at_once", "a finalize lock read empty taken over while its maker writes its name",
             "unitoken_jax/data/pretokenize.py", "            if not young:\n                return None",
             "            if True:\n                return None",
             ("tests/test_pretokenize.py", "-k", "lock_found_empty")),
    Mutation("init_extras_read_at_export", "what the init model brought besides its weights read again at the export",
             "unitoken_jax/train/loop.py", "UniTokenModel(config.model, state.params, *extras), final)",
             "UniTokenModel(config.model, state.params, *init_extras(config.init_from)), final)",
             ("tests/test_train_loop.py", "-k", "read_at_the_start")),
    Mutation("packed_rows_attend_across_samples", "packed samples attending to each other in the xla attention",
             "unitoken_jax/models/attention.py",
             "(x.astype(work) for x in (q_BTNH, k_BTKH, v_BTKH)), segment_ids_BT, block)",
             "(x.astype(work) for x in (q_BTNH, k_BTKH, v_BTKH)), jnp.minimum(segment_ids_BT, 1), block)",
             ("tests/test_pipeline.py", "-k", "trains_each_sample")),
    Mutation("static_batch_cut_at_shutdown", "a static batch still running at shutdown cut with a plain 500",
             "unitoken_jax/serve/app.py", "                                                             "
             "self.app_scheduler.tell_running)", "                                                             "
             "lambda: None)", ("tests/test_serve.py", "-k", "still_running_when_the_server")),
    Mutation("continuous_gauges_stale", "a continuous server's row gauges left at their last admission",
             "unitoken_jax/serve/scheduler.py",
             "            with self._cond:  # the rows the chunk's finished calls left", "            if False:  # x",
             ("tests/test_serve.py", "-k", "gauges_fall")),
    Mutation("continuous_chunk_cut_at_shutdown", "a continuous chunk still running at shutdown cut with a plain 500",
             "unitoken_jax/serve/scheduler.py",
             "            for job, _ in list(self._running.values()):  # (the worker's deletions",
             "            for job, _ in []:  # (the worker's deletions",
             ("tests/test_serve.py", "-k", "continuous_chunk_still_running")),
    Mutation("pissa_read_as_plain_lora", "PiSSA / OLoRA adapters read as plain factors on the original weights",
             "unitoken_jax/convert/peft.py",
             "    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):", "    if False:", ("tests/test_lora.py", "-k", "rewrite_their_base")),
    Mutation("embedding_lora_said_stray", "an embedding's LoRA said to be a stray tensor",
             "unitoken_jax/convert/peft.py", "            if (embedding := _EMBEDDING_FACTOR.match(key)) is not None:",
             "            if (embedding := _EMBEDDING_FACTOR.match(key)) is not None and False:",
             ("tests/test_lora.py", "-k", "said_for_what")),
    Mutation("mixed_stream_cut_in_its_pattern", "the datasets' fixed mixing pattern cut between processes",
             "unitoken_jax/data/pipeline.py",
             "    return grain.experimental.WindowShuffleMapDataset(mixed, window_size=_MIX_WINDOW, seed=window_seed)",
             "    return mixed", ("tests/test_pipeline.py", "-k", "mixes_the_datasets")),
    Mutation("record_twice_in_a_batch", "one record packed twice into a batch from the look-ahead window",
             "unitoken_jax/data/pipeline.py", "            if i and any(s.record in packed for s in group):",
             "            if False:", ("tests/test_pipeline.py", "-k", "record_twice")),
    Mutation("empty_dataset_unnamed", "a dataset of no records failing in array_record, unnamed",
             "unitoken_jax/data/pretokenize.py", "    if len(kinds) == 0:  # (array_record's", "    if False:  # (",
             ("tests/test_pipeline.py", "-k", "named_as_empty")),
    Mutation("aot_config_error_traceback", "aot_check's config errors a traceback, not an argparse line",
             "launch/aot_check.py", "    except (ValueError, FileNotFoundError) as e:  # (a config key, value or file",
             "    except RuntimeError as e:  # (a config key, value or file", ("tests/test_aot.py", "-k", "malformed")),
    Mutation("workdir_file_traceback", "a workdir that is a file ending in makedirs' traceback",
             "unitoken_jax/train/loop.py", "    if os.path.exists(workdir) and not os.path.isdir(workdir):",
             "    if False:", ("tests/test_train_loop.py", "-k", "is_a_file_and_pod")),
    Mutation("pod_flags_ignored", "--num_processes / --process_id without --coordinator ignored",
             "unitoken_jax/train/__main__.py", "        if given:  # (without them, every", "        if False:  # (",
             ("tests/test_train_loop.py", "-k", "is_a_file_and_pod")),
    Mutation("out_writer_not_tried", "an --out format whose writer takes no colour picture found after drawing",
             "unitoken_jax/cli.py", "        Image.new(\"RGB\", (1, 1)).save(io.BytesIO(), format=kind)",
             "        pass",
             ("tests/test_default_model.py", "-k", "slips_are_refused")),
    Mutation("prompts_file_options_blamed_on_lines", "generate --prompts-file blaming an option on every line",
             "unitoken_jax/cli.py", "    if todo:  # the options first, with an empty prompt",
             "    if False:  # the options first, with an empty prompt",
             ("tests/test_default_model.py", "-k", "draws_a_file_of_prompts")),
    Mutation("cache_growth_on_scan_ignored", "cache_growth taken by scanned layers and doing nothing",
             "unitoken_jax/inference/decode.py", "        if cache_growth is not None and layers != \"unrolled\":",
             "        if False:", ("tests/test_inference.py", "-k", "cache_grows_as_its_rows")),
    Mutation("serve_binds_after_loading", "unitoken serve loading the model before finding its port taken",
             "unitoken_jax/cli.py", "    sock = bind(args.host, args.port)\n", "    sock = None\n",
             ("tests/test_serve.py", "-k", "unitoken_serve_serves_the_bundled")),
    Mutation("sweep_set_twice_last_wins", "a sweep's --set key given twice, the last winning unsaid",
             "unitoken_jax/sweep.py", "            if key in pairs:  # (the last had won, unsaid)",
             "            if False:", ("tests/test_sweep.py", "-k", "unknown_key")),
    Mutation("usage_left_out_of_earlier_chunks", "with include_usage, the chunks before the last without a usage field",
             "unitoken_jax/serve/wire.py", "    if usage is not None or include_usage:", "    if usage is not None:",
             ("tests/test_serve.py", "-k", "plain_value_are_accepted")),
    Mutation("resume_past_total_exports", "a total_steps below the step reached exporting a mid-schedule model",
             "unitoken_jax/train/loop.py", "        if start_step > end:  # (it exported", "        if False:  # (",
             ("tests/test_train_loop.py", "-k", "resumed_to_go_further")),
    Mutation("log_window_lost_at_stop", "a stop between logging steps losing that window's sums",
             "unitoken_jax/train/loop.py", "                if window.steps:  # this process's unlogged steps",
             "                if False:  # this process's unlogged steps",
             ("tests/test_train_loop.py", "-k", "in_a_new_process_is_bit_exact")),
    Mutation("other_sizes_tried_as_damage", "checkpoints of another model's sizes restored and taken for damage",
             "unitoken_jax/train/checkpoint.py", "        self._check_sizes(abstract_state, steps[0], reader)\n", "",
             ("tests/test_checkpointing.py", "-k", "other_sizes")),
    Mutation("page_shows_a_cut_stream", "the page showing a stream cut before its end as a finished answer",
             "unitoken_jax/serve/static/index.html", "  if (finish === null) throw new Error(",
             "  if (false) throw new Error(", ("tests/test_web_page.py", "-k", "cut_before_its_end")),
    Mutation("page_body_limit_not_too_long", "the page's conversation stuck at the server's body limit",
             "unitoken_jax/serve/static/index.html", ', "too_many_images", "request_too_large"];',
             ', "too_many_images"];', ("tests/test_web_page.py", "-k", "outgrows")),
    Mutation("tokenizer_file_truncates_text", "a tokenizer file's truncation cutting text, unsaid",
             "unitoken_jax/tokenizer/text.py", "plain = dict(spec, added_tokens=[], truncation=None, padding=None)",
             "plain = dict(spec, added_tokens=[])", ("tests/test_tokenizer.py", "-k", "truncation_or_padding")),
    Mutation("empty_pinpoints_two_meanings", "an empty AnyRes pinpoint list the defaults in one place, none in another",
             "unitoken_jax/tokenizer/anyres.py", "    if pinpoints is None or len(pinpoints) == 0:\n",
             "    if pinpoints is None:\n", ("tests/test_images.py", "-k", "smaller_tile")),
    Mutation("training_mesh_uneven_unnamed", "a training mesh that does not split the weights left to JAX's error",
             "unitoken_jax/train/program.py", "    if uneven:  # (JAX's IndivisibleError", "    if False:  # (",
             ("tests/test_train_loop.py", "-k", "does_not_split")),
    Mutation("stream_progress_task_left", "a stream closed by its client leaving its progress task pending",
             "unitoken_jax/serve/app.py", "                    if not report.done():", "                    if False:",
             ("tests/test_serve.py", "-k", "no_pending_task")),
)


def _copy_repository(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def run(mutation: Mutation, scratch: str) -> tuple[str, float, str]:
    path = os.path.join(scratch, mutation.file)
    original = open(path).read()
    if original.count(mutation.old) != 1:
        return "NOT PLANTED (the code moved)", 0.0, ""
    with open(path, "w") as f:
        f.write(original.replace(mutation.old, mutation.new))
    try:
        env = {**os.environ, "PYTHONPATH": scratch, "JAX_PLATFORMS": "cpu"}
        env.pop("CI", None)
        start = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
                           cwd=scratch, env=env, capture_output=True, text=True)
        seconds = time.time() - start
        failed = [line.split(" ")[1] for line in r.stdout.splitlines() if line.startswith("FAILED ")]
        if r.returncode == 1 or failed:  # with xdist, -x stopping after a failure exits 2 ("interrupted")
            return "caught", seconds, failed[0] if failed else ""
        status = "MISSED" if r.returncode == 0 else f"error (pytest exit {r.returncode})"
        return status, seconds, (r.stdout + r.stderr)[-1500:]
    finally:
        with open(path, "w") as f:
            f.write(original)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="a mutation's name (repeatable)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="unitoken-mutations-") as scratch:
        _copy_repository(scratch)
        for m in chosen:
            status, seconds, detail = run(m, scratch)
            rows.append((m, status, seconds, detail))
            print(f"{m.name}: {status} ({seconds:.0f} s) {detail}", flush=True)
    print("\n| planted bug | file | tests run | result | first failing test |")
    print("|---|---|---|---|---|")
    for m, status, seconds, detail in rows:
        first = detail if status == "caught" else ""
        print(f"| {m.what} | `{m.file}` | `{' '.join(m.tests)}` | {status} ({seconds:.0f} s) | `{first}` |")
    return 0 if all(status == "caught" for _, status, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
