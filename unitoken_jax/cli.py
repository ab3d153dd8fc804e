"""The `unitoken` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from unitoken_jax.convert import orbax_io


def _convert(args) -> int:
    from unitoken_jax.convert import hf as hf_io

    if orbax_io.is_orbax_checkpoint(args.src):
        config, params, passthrough, sidecar = orbax_io.restore(args.src)
        dtype = args.dtype or sidecar.get("hf_dtype", "float32")
        hf_io.write_hf(args.dst, config, params, passthrough, sidecar.get("hf_config"), dtype,
                       shard_bytes=int(args.max_shard_gb * 1024**3), progress=True)
        print(f"wrote the HF layout ({dtype}) to {args.dst}")
    else:
        import jax

        # Each parameter moves to the (host) device as it is read, so numpy copies never pile up.
        ckpt = hf_io.read_hf(args.src, param_dtype=args.dtype, progress=True,
                             place=lambda config, path, array: jax.device_put(array))
        orbax_io.save(args.dst, ckpt.config, ckpt.params, ckpt.passthrough,
                      {"hf_config": ckpt.hf_config, "hf_dtype": ckpt.dtype})
        layout = f", QK-norm layout {ckpt.qk_norm_layout}" if ckpt.qk_norm_layout else ""
        print(f"read a {ckpt.kind} checkpoint ({ckpt.dtype}{layout}); wrote our Orbax checkpoint to {args.dst}")
    return 0


def _init(args) -> int:
    import importlib.util

    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.models.config import UniTokenConfig

    path = args.config
    if ":" in path or path.endswith(".py"):
        file, _, arg = path.partition(":")
    else:  # a bare name: one of the bundled model configs
        file, arg = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "model.py"), path
    spec = importlib.util.spec_from_file_location("unitoken_config", file)
    if spec is None or not os.path.exists(file):
        raise FileNotFoundError(f"no config file {file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = UniTokenConfig.from_dict((module.get_config(arg) if arg else module.get_config()).model)
    model = UniTokenModel.random(config, seed=args.seed)
    model.save_hf(args.dst, dtype=args.dtype, progress=True)
    print(f"wrote a randomly initialised {model!r} in the HF layout to {args.dst}")
    return 0


def _reconstruct(args) -> int:
    from unitoken_jax.tokenizer.images import load_image, vq_crop
    from unitoken_jax.tokenizer.vq import VQTokenizer

    vqgan = args.vqgan or os.environ.get("UNITOKEN_VQGAN")
    if not vqgan:
        raise ValueError("no VQ-GAN: pass --vqgan path/to/vqgan.ckpt (with vqgan.yaml beside it) or set UNITOKEN_VQGAN")
    vq = VQTokenizer.from_meta(vqgan)
    image = load_image(args.image)
    codes = vq.encode_images([image], size=args.size)
    h, w = codes.shape[1:]
    picture = vq.decode_to_pil(codes)[0]
    if args.side_by_side:
        from PIL import Image

        crop = vq_crop(image, args.size).convert("RGB")
        both = Image.new("RGB", (2 * args.size, args.size))
        both.paste(crop, (0, 0))
        both.paste(picture, (args.size, 0))
        picture = both
    picture.save(args.out)
    print(f"{args.image}: {image.width}x{image.height} -> {args.size}x{args.size} crop -> {h}x{w} codes "
          f"({h * w} tokens, {len(set(codes.ravel().tolist()))} distinct) -> {args.out}")
    return 0


def hf_io_shard_gb() -> float:
    from unitoken_jax.convert.hf import SHARD_BYTES

    return SHARD_BYTES / 1024**3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unitoken", description="UniToken in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="HF safetensors layout <-> our Orbax checkpoint (direction from --from)")
    convert.add_argument("--from", dest="src", required=True, help="an HF-format dir, or one of our Orbax dirs")
    convert.add_argument("--to", dest="dst", required=True, help="output directory")
    convert.add_argument("--dtype", default=None,
                         help="dtype to store (default: the source's own, so the conversion is lossless)")
    convert.add_argument("--max-shard-gb", type=float, default=hf_io_shard_gb(),
                         help="largest safetensors file written (and held in memory) when writing the HF layout")
    convert.set_defaults(func=_convert)
    init = sub.add_parser("init", help="write a randomly initialised model in the HF layout")
    init.add_argument("--config", default="tiny",
                      help="a model config: 'tiny', '7b', '7b_anyres', or FILE.py[:ARG] with get_config(arg).model")
    init.add_argument("--to", dest="dst", required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float32", help="dtype of the written tensors")
    init.set_defaults(func=_init)
    recon = sub.add_parser("reconstruct", help="image -> VQ codes -> image: the tokenizer at work on a photo")
    recon.add_argument("image")
    recon.add_argument("--out", required=True, help="where to write the reconstruction (PNG)")
    recon.add_argument("--vqgan", default=None, help="Meta's vqgan.ckpt (vqgan.yaml beside it); or $UNITOKEN_VQGAN")
    recon.add_argument("--size", type=int, default=512, help="crop side in pixels (a multiple of 32)")
    recon.add_argument("--side-by-side", action="store_true", help="write the crop and its reconstruction together")
    recon.set_defaults(func=_reconstruct)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"unitoken {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
