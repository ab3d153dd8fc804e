"""Model configs: `--config configs/model.py:7b`, `:7b_anyres` or `:tiny`.

`get_config(arg)` returns an ml_collections ConfigDict whose `model` field is read by
`unitoken_jax.UniTokenConfig.from_dict`. The 7B numbers are those of the released UniToken
checkpoints (Chameleon-7B / Lumina-mGPT-7B-512 decoder, SigLIP so400m/14 @ 384).
"""

import ml_collections

ANYRES_GRID_PINPOINTS = ((384, 768), (768, 384), (768, 768), (384, 1152), (1152, 384))


def decoder_7b():
    return dict(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                num_kv_heads=32, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                qk_norm_eps=1e-5, qk_norm_groups=1, swin_norm=False, dropout=0.0)


def vision_so400m():
    return dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, patch_size=14,
                image_size=384, num_channels=3, layer_norm_eps=1e-6)


def model_config(arg: str) -> ml_collections.ConfigDict:
    if arg in ("7b", "7b_anyres"):
        model = dict(decoder=decoder_7b(), vision=vision_so400m(), z_loss_weight=1e-5, dtype="bfloat16",
                     param_dtype="float32", scan_layers=True, remat_policy="full",
                     attention="auto", attention_block=512,  # splash on TPU, in 512-position blocks
                     loss_chunk=512)  # the fused LM head and loss, over this many predicting positions at a time
    elif arg == "tiny":
        model = dict(
            decoder=dict(vocab_size=8960, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=4, rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5,
                         qk_norm_eps=1e-5, qk_norm_groups=None, swin_norm=False, dropout=0.0),
            vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=14,
                        image_size=56, num_channels=3, layer_norm_eps=1e-6),
            z_loss_weight=1e-5, dtype="float32", param_dtype="float32", scan_layers=True, remat_policy="none",
            attention="auto", attention_block=128, loss_chunk=512)
    else:
        raise ValueError(f"unknown model config {arg!r}; choose 7b, 7b_anyres or tiny")
    return ml_collections.ConfigDict(model)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_name = arg
    config.model = model_config(arg)
    # AnyRes is a property of how images are laid out (tokenizer side); the weights are the same.
    config.anyres = arg == "7b_anyres"
    config.anyres_grid_pinpoints = ANYRES_GRID_PINPOINTS if config.anyres else ()
    return config
