"""Builds tiny random PyTorch models (transformers' Chameleon and SigLIP, the reference's adapter)
and writes them in the released checkpoints' layout, for parity tests against our loader."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel

VOCAB = 8960
SEP, EOSS = 8198, 8196


def chameleon_config(swin_norm=False, layers=2, heads=4, kv_heads=4, hidden=64, mp=1):
    # rope_theta is not the default, so a loader that ignores it fails the parity tests.
    return ChameleonConfig(rope_theta=20000.0,
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        swin_norm=swin_norm, model_parallel_size=mp, vocabulary_map={"<image>": 8711},
        vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
                       num_res_blocks=1, latent_channels=8, attn_resolutions=[], resolution=32),
        attn_implementation="eager")


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere, norms included, so no parameter is trivially 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def tie_qk_norm_groups_(model, groups: int) -> None:
    """Make QK-norm rows identical within each of `groups` groups (the Lumina-mGPT layout)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                for p in (norm.weight, norm.bias):
                    per = p.shape[0] // groups
                    p.copy_(p[::per].repeat_interleave(per, dim=0))


def make_chameleon(seed=0, **kw):
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(chameleon_config(**kw)).eval()
    randomize_(model, seed)
    if kw.get("mp", 1) != kw.get("heads", 4):
        tie_qk_norm_groups_(model, kw.get("mp", 1))
    return model


def make_siglip(seed=1, hidden=32, layers=2, heads=2, image_size=56, patch=14, intermediate=48):
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, image_size=image_size, patch_size=patch,
                             attn_implementation="eager")
    model = SiglipVisionModel(cfg).eval()
    randomize_(model, seed)
    return model


def make_adapter(vision_hidden, hidden, seed=2):
    torch.manual_seed(seed)
    adapter = torch.nn.Sequential(torch.nn.Linear(vision_hidden, hidden), torch.nn.GELU(),
                                  torch.nn.Linear(hidden, hidden)).eval()
    randomize_(adapter, seed)
    return adapter


def decoder_state_dict(model, layout: str):
    """transformers' layout keeps QK-norm [heads, head_dim]; 'lumina' stores [mp, head_dim]."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if layout == "lumina":
        mp = model.config.model_parallel_size
        for k in list(sd):
            if ".q_norm." in k or ".k_norm." in k:
                per = sd[k].shape[0] // mp
                sd[k] = sd[k][::per].contiguous()
    return sd


def write_checkpoint(path, tensors: dict, config: dict, shards: int = 1):
    os.makedirs(path, exist_ok=True)
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in keys}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, chunk in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in chunk}, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in chunk})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def write_chameleon(path, model, layout="transformers", shards=1):
    if layout == "transformers" and shards == 1:
        model.save_pretrained(path, safe_serialization=True)  # exactly what transformers writes
        return
    cfg = model.config.to_dict()
    write_checkpoint(path, decoder_state_dict(model, layout), cfg, shards)


def write_unitoken(path, chameleon, siglip, adapter, layout="lumina", shards=1, z_loss_weight=1e-5,
                   describe_vit=True):
    """The UniToken release layout: model.*, lm_head.*, vit.*, adapter.0.*, adapter.2.*."""
    tensors = decoder_state_dict(chameleon, layout)
    for k, v in siglip.state_dict().items():  # the SiglipVisionTransformer keys: embeddings.*, encoder.*, ...
        tensors["vit." + k] = v.detach().clone().contiguous()
    for k, v in adapter.state_dict().items():
        tensors["adapter." + k] = v.detach().clone().contiguous()
    cfg = chameleon.config.to_dict()
    cfg["z_loss_weight"] = z_loss_weight
    vc = siglip.config
    if describe_vit:
        # Our extension: the release's config.json says nothing of its ViT (so400m, whose head
        # count the loader knows); a tiny test tower must say its own.
        cfg["unitoken_vision_config"] = {"num_attention_heads": vc.num_attention_heads,
                                         "layer_norm_eps": vc.layer_norm_eps}
    write_checkpoint(path, tensors, cfg, shards)


def hf_logits(chameleon, input_ids=None, inputs_embeds=None):
    """Unmasked logits: transformers' ChameleonForConditionalGeneration sets image-token logits to
    -inf, which the UniToken fork makes optional (mask_image_logits); compare the raw lm_head."""
    with torch.no_grad():
        out = chameleon.model(input_ids=input_ids, inputs_embeds=inputs_embeds)
        return chameleon.lm_head(out.last_hidden_state).float().numpy()


# --- a VQ-GAN checkpoint in Meta's format (taming-transformers modules) ---------------------------

VQ_DD = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=[], dropout=0.0,
             in_channels=3, resolution=64, z_channels=32, double_z=False)
VQ_EMBED, VQ_N_EMBED = 8, 64


def write_meta_vqgan(path, seed=0, n_embed=VQ_N_EMBED):
    """vqgan.ckpt (Lightning-style, with loss.* tensors to be skipped) + vqgan.yaml in `path`;
    returns the torch modules (encoder, decoder, quant_conv, post_quant_conv, codebook)."""
    import taming.modules.diffusionmodules.model as taming

    dd = VQ_DD
    torch.manual_seed(seed)
    enc, dec = taming.Encoder(**dd).eval(), taming.Decoder(**dd).eval()
    quant_conv = torch.nn.Conv2d(dd["z_channels"], VQ_EMBED, 1)
    post_quant_conv = torch.nn.Conv2d(VQ_EMBED, dd["z_channels"], 1)
    codebook = torch.nn.Embedding(n_embed, VQ_EMBED)
    for m in (enc, dec, quant_conv, post_quant_conv, codebook):
        randomize_(m, seed)
    sd = {}
    for prefix, m in (("encoder.", enc), ("decoder.", dec), ("quant_conv.", quant_conv),
                      ("post_quant_conv.", post_quant_conv)):
        sd.update({prefix + k: v for k, v in m.state_dict().items()})
    sd["quantize.embedding.weight"] = codebook.weight.detach().clone()
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": sd, "epoch": 7, "global_step": 1000}, os.path.join(path, "vqgan.ckpt"))
    with open(os.path.join(path, "vqgan.yaml"), "w") as f:
        f.write("model:\n  params:\n    embed_dim: %d\n    n_embed: %d\n    ddconfig:\n" % (VQ_EMBED, n_embed))
        for k, v in dd.items():
            f.write(f"      {k}: {list(v) if isinstance(v, tuple) else v}\n")
    return enc, dec, quant_conv, post_quant_conv, codebook
