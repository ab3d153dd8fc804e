"""The `unitoken` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections import Counter

from unitoken_jax import __version__, argtypes, configs
from unitoken_jax.convert.files import SHARD_BYTES
from unitoken_jax.models.config import QUANTIZE_MODES
from unitoken_jax.shutdown import STOPS, Terminated, exit_now, stop_on_signals

_LOG = logging.getLogger("unitoken_jax.cli")  # by name: run as `python -m unitoken_jax.cli` it is __main__
CHAT_MAX_NEW_TOKENS = 2048  # inference.pipeline's (not imported here: it brings JAX into `--help`)


def _convert(args) -> int:
    from unitoken_jax.convert import hf as hf_io
    from unitoken_jax.convert import orbax_io
    from unitoken_jax.convert.files import keep_trained_record

    _directory_option("--to", args.dst)  # (was 'File exists', after reading the source)
    if os.path.realpath(args.src) == os.path.realpath(args.dst):  # (int8 over the float weights, for good)
        raise ValueError(f"--to {args.dst} is --from: a conversion writes a new checkpoint; give another directory")
    _refuse_held_checkpoint(args.dst, args.overwrite)  # (it was replaced unsaid: an int8 one for good)
    writes_hf = orbax_io.is_orbax_checkpoint(args.src) and args.quantize in (None, "none")
    if args.max_shard_gb is not None and not writes_hf:  # (it was silently not used)
        raise ValueError(f"--max-shard-gb sizes the HF layout's safetensors files; this conversion writes our Orbax "
                         f"checkpoint ({'--quantize' if args.quantize not in (None, 'none') else '--from is HF'})")
    if args.quantize not in (None, "none"):  # quantize once: HF or float Orbax -> an int8 Orbax checkpoint
        import unitoken_jax

        model = unitoken_jax.load(args.src, param_dtype=args.dtype, quantize=args.quantize)
        model.save(args.dst)
        print(f"wrote {model.config.quantize} weights ({model.num_params() / 1e6:.1f}M values) in our Orbax "
              f"format to {args.dst}")
        return 0
    if orbax_io.is_orbax_checkpoint(args.src):
        from unitoken_jax.models import lora as lora_lib

        from unitoken_jax.model import read_config

        stored = read_config(args.src).quantize
        if stored != "none":  # (its int8 codes would be written as weights, its scales dropped; said before reading)
            raise ValueError(f"--from {args.src} holds {stored} weights, which the HF layout cannot carry; "
                             "convert the float checkpoint it was made from")
        config, params, passthrough, sidecar = orbax_io.restore(args.src)
        params, config = lora_lib.merge(params, config)  # a LoRA model is written merged, as save_hf writes it
        dtype = args.dtype or sidecar.get("hf_dtype", "float32")
        hf_io.write_hf(args.dst, config, params, passthrough, sidecar.get("hf_config"), dtype,
                       shard_bytes=int(args.max_shard_gb * 1024**3) if args.max_shard_gb else SHARD_BYTES,
                       progress=True)
        print(f"wrote the HF layout ({hf_io.dtype_name(dtype)}) to {args.dst}")
    else:
        import jax

        # Each parameter moves to the (host) device as it is read, so numpy copies never pile up.
        ckpt = hf_io.read_hf(args.src, param_dtype=args.dtype, progress=True,
                             place=lambda config, path, array: jax.device_put(array))
        # --dtype is what it holds now, and what a conversion back writes by default (that wrote the source's:
        # a bfloat16 copy of a float32 release came back as float32 files of bfloat16 values)
        orbax_io.save(args.dst, ckpt.config, ckpt.params, ckpt.passthrough,
                      {"hf_config": ckpt.hf_config, "hf_dtype": args.dtype or ckpt.dtype})
        layout = f", QK-norm layout {ckpt.qk_norm_layout}" if ckpt.qk_norm_layout else ""
        print(f"read a {ckpt.kind} checkpoint ({hf_io.dtype_name(ckpt.dtype)}{layout}); wrote our Orbax checkpoint "
              + (f"({args.dtype}) " if args.dtype else "") + f"to {args.dst}")
    keep_trained_record(args.src, args.dst)  # (a model trained here keeps its pictures' record)
    return 0


def _refuse_held_checkpoint(path: str, overwrite: bool) -> None:
    """A ValueError when `path` holds a checkpoint (HF files or ours) and `overwrite` is not given."""
    from unitoken_jax.convert import orbax_io

    held = sorted(f for f in os.listdir(path) if f == "config.json" or f.endswith(".safetensors")) \
        if os.path.isdir(path) else []
    held += ["our Orbax checkpoint"] if orbax_io.is_orbax_checkpoint(path) else []
    if held and not overwrite:
        raise ValueError(f"--to {path} holds a checkpoint already ({', '.join(held[:3])}"
                         f"{', ...' if len(held) > 3 else ''}); give a new directory, or --overwrite to replace it")


def _init(args) -> int:
    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.models.config import UniTokenConfig

    _directory_option("--to", args.dst)
    _refuse_held_checkpoint(args.dst, args.overwrite)  # random weights over a real model's, perhaps the release's
    spec = args.config
    if ":" not in spec and not spec.endswith(".py") and not os.path.isfile(spec):
        spec = f"model.py:{spec}"  # a bare name: one of the packaged model presets (configs/model.py)
    config = UniTokenConfig.from_dict(configs.get_config(spec).model)
    model = UniTokenModel.random(config, seed=args.seed)
    model.save_hf(args.dst, dtype=args.dtype, progress=True)
    print(f"wrote a randomly initialised {model!r} in the HF layout to {args.dst}")
    return 0


def _reconstruct(args) -> int:
    from unitoken_jax.tokenizer.images import load_image, vq_crop, whiten
    from unitoken_jax.vq_tokenizer import VQTokenizer

    from unitoken_jax.world import default

    _check_out(args.out)
    vqgan = args.vqgan or os.environ.get("UNITOKEN_VQGAN")
    _compilation_cache(args)
    if not vqgan and default.available():  # as the other verbs fall back to the bundled model
        vqgan = os.path.join(default.DEFAULT_DIR, "vqgan")
        args.size = default.settings()["vq_size"] if args.size is None else args.size
        _LOG.info("no --vqgan: using the bundled shapes-world VQ-GAN (%s), %d px crops", vqgan, args.size)
    if not vqgan:
        raise ValueError("no VQ-GAN: pass --vqgan (Meta's vqgan.ckpt with vqgan.yaml beside it, a VQ-GAN directory "
                         "this package wrote, or an HF Chameleon / UniToken directory) or set UNITOKEN_VQGAN")
    args.size = 512 if args.size is None else args.size
    image = load_image(args.image)  # a bad picture is refused before the VQ-GAN loads
    vq = VQTokenizer.load(vqgan)
    if args.size % vq.config.downsample_factor:
        raise ValueError(f"--size {args.size}: this VQ-GAN takes sides that are multiples of "
                         f"{vq.config.downsample_factor} px")
    codes = vq.encode_images([image], size=args.size)
    h, w = codes.shape[1:]
    picture = vq.decode_to_pil(codes)[0]
    if args.side_by_side:
        from PIL import Image

        crop = whiten(vq_crop(image, args.size))  # what the VQ-GAN was given: transparency on white
        both = Image.new("RGB", (2 * args.size, args.size))
        both.paste(crop, (0, 0))
        both.paste(picture, (args.size, 0))
        picture = both
    picture.save(args.out)
    print(f"{args.image}: {image.width}x{image.height} -> {args.size}x{args.size} crop -> {h}x{w} codes "
          f"({h * w} tokens, {len(set(codes.ravel().tolist()))} distinct) -> {args.out}")
    return 0


def _pipeline(args):
    import unitoken_jax
    from unitoken_jax.inference.pipeline import UniTokenPipeline
    from unitoken_jax.tokenizer.text import TextTokenizer
    from unitoken_jax.vq_tokenizer import VQTokenizer

    from unitoken_jax.world import default

    _compilation_cache(args)
    template = getattr(args, "template", None)
    if template is not None:  # (refused before the model loads)
        from unitoken_jax.inference.pipeline import check_template

        try:
            check_template(template)
        except ValueError as e:
            raise ValueError(f"--template: {e}") from None
    if not (args.model or os.environ.get("UNITOKEN_MODEL")):
        if not default.available():
            raise ValueError("no --model given, $UNITOKEN_MODEL is not set, and this install has no bundled model")
        ignored = [flag for flag, given in (("--tokenizer", getattr(args, "tokenizer", None)),
                                            ("--vqgan", getattr(args, "vqgan", None)),
                                            ("--vq-size", getattr(args, "vq_size", None) is not None),
                                            ("--anyres", getattr(args, "anyres", False))) if given]
        if ignored:  # the bundled model comes with its own (they were silently not used)
            raise ValueError(f"{', '.join(ignored)} given without --model: the bundled model brings its own tokenizer, "
                             "VQ-GAN and picture settings; name the model they go with (--model or $UNITOKEN_MODEL)")
        unused = [f"${env}" for env in ("UNITOKEN_TOKENIZER", "UNITOKEN_VQGAN") if os.environ.get(env)]
        if unused:  # a shell profile's settings for a release: said, not silently passed over
            _LOG.warning("%s set but $UNITOKEN_MODEL is not: the bundled model uses its own tokenizer and VQ-GAN, "
                         "not %s", " and ".join(unused), "these")
        world = default.settings()
        if getattr(args, "size", None) and _size(args.size) != tuple(world["size"]):  # before loading anything
            raise ValueError(f"the bundled model draws only {world['size'][0]}x{world['size'][1]} pictures, not "
                             f"--size {args.size} (it never saw another size: other sizes come out as noise)")
        args.size = args.size if getattr(args, "size", None) else "x".join(str(v) for v in world["size"])
        _LOG.info("no --model: using the bundled shapes-world model (%s)", default.DEFAULT_DIR)
        prefix = None if args.image_prefix is None else _ids(args.image_prefix)  # (before the model loads)
        how = _how_to_load(args, os.path.join(default.DEFAULT_DIR, "model"))
        pipe = default.pipeline(adapters=args.adapters, cache_growth=args.cache_growth, layers=args.layers, **how)
        if prefix is not None:
            pipe.image_prefix = prefix
        if template is not None:
            pipe.generate_template = template
        _say_placement(pipe.model)
        return pipe
    from unitoken_jax.tokenizer import layout  # (light: constants)
    if getattr(args, "size", None) and any(v % layout.PIXELS_PER_GRID for v in _size(args.size)):  # (before loading)
        raise ValueError(f"--size {args.size}: each side must be a multiple of {layout.PIXELS_PER_GRID} pixels")
    prefix = None if args.image_prefix is None else _ids(args.image_prefix)  # None: from the model

    def given(name, env):
        path = getattr(args, name) or os.environ.get(env)
        if not path:
            raise ValueError(f"no --{name} given and ${env} is not set")
        return os.path.expanduser(path)

    paths = {"model": given("model", "UNITOKEN_MODEL")}
    how = _how_to_load(args, paths["model"])  # a --model that is no model is named before what else is missing
    paths.update(tokenizer=given("tokenizer", "UNITOKEN_TOKENIZER"), vqgan=given("vqgan", "UNITOKEN_VQGAN"))
    demo = [paths[k] == "demo" for k in ("tokenizer", "vqgan")]
    if any(demo) and not all(demo):  # (as pretokenize takes them: a model trained on the demo data)
        raise ValueError("--tokenizer demo and --vqgan demo go together (the demo's small tokenizers)")
    model = unitoken_jax.load(paths["model"], progress=False, adapters=args.adapters, **how)
    if all(demo):  # (a model trained on the demo data: `unitoken pretokenize --tokenizer demo --vqgan demo`)
        from unitoken_jax.data.demo import demo_tokenizers

        text, vq = demo_tokenizers()
    else:
        text, vq = TextTokenizer.from_file(paths["tokenizer"]), VQTokenizer.load(paths["vqgan"], mesh=how["mesh"])
    _say_placement(model)
    pipe = UniTokenPipeline(model, text, vq, anyres=args.anyres,
                            vq_size=args.vq_size, image_prefix=prefix, cache_growth=args.cache_growth,
                            layers=args.layers, **({} if template is None else {"generate_template": template}))
    if hasattr(args, "size") and not args.size:  # the model's own: its training pictures' grid, else 512x512
        args.size, args.own_size = "x".join(map(str, pipe.default_size)), True
    return pipe


def _how_to_load(args, model_dir: str) -> dict:
    """`unitoken_jax.load`'s dtype, param_dtype, mesh and quantize for the model in `model_dir`
    from --dtype, --param-dtype, --mesh and --quantize (their `auto`s decided here)."""
    import unitoken_jax
    from unitoken_jax.inference.fit import mesh_devices

    config = unitoken_jax.read_config(model_dir)
    if getattr(args, "adapters", None) and config.quantize != "none":  # (load's message names its Python arguments)
        raise ValueError(f"--adapters: --model {model_dir} holds {config.quantize} weights, to which adapters cannot "
                         f"be applied; give --model the float checkpoint it was made from (with --quantize "
                         f"{config.quantize} to quantize the sum)")
    dtype, param_dtype = _dtypes(args.dtype, args.param_dtype)
    mesh = _mesh(args.mesh, config)
    from unitoken_jax.inference.pipeline import trained_record

    quantize = _quantize(args, config, mesh_devices(mesh), param_dtype, mesh.shape["tensor"] if mesh else 1, dtype,
                         trained=trained_record(model_dir))
    return dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, quantize=quantize)


def _mesh(text: str, config):
    """The devices an inference verb runs on (`--mesh`): None for one device, else a mesh of this
    host's devices (a host runs its own copy; pods split the work with --process-index)."""
    import jax

    from unitoken_jax import sharding
    from unitoken_jax.inference.fit import choose_mesh

    devices = jax.local_devices()
    if text in ("auto", "one"):
        # CPU "devices" are parts of one machine (or faked for tests): nothing to gain from a split
        split = text == "auto" and any(d.platform != "cpu" for d in devices)
        mesh = choose_mesh(config, devices) if split else None
        if mesh is None:
            _LOG.info("mesh: one device (%s)", devices[0])
            return None
    else:  # ('auto' and 'one' are the flag's other forms)
        shape = sharding.parse_mesh_shape(text, len(devices), words=("auto", "one"),
                                          devices_said=f"this host's {len(devices)} device(s) ({devices[0].platform})")
        mesh = sharding.make_mesh(*shape, devices=devices[:math.prod(shape)])
        from unitoken_jax.models.unitoken import uneven_split

        uneven = uneven_split(config, mesh)
        if uneven:
            raise ValueError(f"--mesh {text} ({dict(mesh.shape)}) does not split the model's weights evenly: "
                             f"{uneven}; give axis sizes that divide it, or --mesh auto")
    _LOG.info("mesh: %s over %d %s device(s) of this host's %d", dict(mesh.shape), mesh.devices.size,
              devices[0].platform, len(jax.local_devices()))
    return mesh


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _plan(args, config, trained: dict | None = None) -> tuple[int, str, dict]:
    """What --quantize auto plans the memory for: (pictures at once, the load in words, keywords of
    `inference.fit.decode_memory` for its KV cache), the command's most at once by its own flags;
    the picture layout as the pipeline will take it: the flags', else what a trained model records
    of its data (`trained`, `inference.pipeline.trained_record`)."""
    from unitoken_jax.inference.fit import decoder_positions, picture_prompt_length
    from unitoken_jax.inference.pipeline import trained_size, trained_vq_size

    trained = trained or {}
    # no --size: the model's own, as the pipeline will draw it (its training pictures' grid, at the
    # release VQ-GAN's 16 px a code: the VQ-GAN is not loaded yet), else 512x512
    size = _size(args.size) if getattr(args, "size", None) else trained_size(trained, None) or (512, 512)
    anyres = getattr(args, "anyres", None)
    anyres = trained.get("anyres") is True if anyres is None else anyres
    vq_size = getattr(args, "vq_size", None) or trained_vq_size(trained) or 512
    picture = picture_prompt_length(config, vq_size, anyres)
    if args.command == "generate":
        n = args.batch_size or (16 if args.prompts_file else args.n)
        return n, f"{n} picture(s) (--n / --batch-size)", dict(size=size, cfg=args.cfg != 1)
    if args.command == "edit":  # (it planned for one edit, whatever --n drew at once)
        n = args.batch_size or args.n
        return n, f"{n} edit(s) of a picture (--n / --batch-size)", dict(size=size, cfg=args.cfg != 1,
                                                                          prompt_length=64 + picture)
    if args.command == "serve" and args.batching == "continuous":  # every slot holds its whole cache
        length = args.slot_length or decoder_positions(config, anyres)
        return 1, f"{args.max_batch} rows of {length} positions (--max-batch, --slot-length)", \
            dict(rows=args.max_batch, positions=length)
    if args.command == "serve":  # a batch of guided pictures, the heaviest load of the usual calls
        n = max(1, args.max_batch // 2)
        return n, f"{n} guided picture(s) in a batch (--max-batch {args.max_batch})", {}
    # answers: a row each (a chat's picture two), after a prompt holding its pictures
    rows = args.batch_size if args.command == "caption" else 2 if args.command == "chat" else 1
    pictures = len(args.inputs) - 1 if args.command == "understand" else 1
    positions = 64 + pictures * picture + args.max_new_tokens
    return 1, f"{rows} answer row(s) of {positions} positions", dict(rows=rows, positions=positions)


def _quantize(args, config, devices, param_dtype: str, tensor: int | None = None,
              dtype: str = "bfloat16", trained: dict | None = None) -> str | None:
    """--quantize: 'auto' keeps a checkpoint stored quantized as it is (and checks that it fits),
    and otherwise takes int8 only where bfloat16 weights and the KV cache (in the compute `dtype`)
    of what this command decodes at once do not fit the devices (`inference.fit.choose_quantize`;
    a CPU has no limit to plan with, so floats there). None: the checkpoint's own format."""
    if args.quantize == "none" and config.quantize != "none":  # (load's message names its own quantize='none')
        raise ValueError(f"--quantize none: the checkpoint holds {config.quantize} weights, which cannot be made float "
                         "again; load the float checkpoint it was made from (or leave --quantize auto)")
    if args.quantize != "auto":
        return args.quantize
    if config.quantize == "none" and param_dtype != "bfloat16":  # float32 weights asked for
        _LOG.info("--quantize auto: %s weights (--dtype / --param-dtype) are kept as they are; int8 is taken only "
                  "where bfloat16 weights do not fit (--quantize int8 to choose it)", param_dtype)
        return None
    from unitoken_jax.inference.fit import choose_quantize

    images, what, memory = _plan(args, config, trained)
    quantize, why = choose_quantize(config, images, devices, what=what, tensor=tensor, dtype=param_dtype,
                                    cache_dtype=dtype, **memory)
    _LOG.info("--quantize auto: %s", why)
    return None if quantize == "none" or config.quantize != "none" else quantize


def _dtypes(dtype: str, param_dtype: str, platform: str | None = None) -> tuple[str, str]:
    """(compute dtype, weights' dtype) for --dtype / --param-dtype: `auto` is bfloat16 on an
    accelerator (the release in float32 is 28 GiB of weights, more than a Colab TPU chip holds) and
    float32 on a CPU (whose bfloat16 dots are slow); the weights follow the compute dtype."""
    from unitoken_jax.model import auto_dtype

    if platform is None:
        import jax

        platform = jax.local_devices()[0].platform
    if dtype == "auto":
        dtype = auto_dtype(platform)
    return dtype, dtype if param_dtype == "auto" else param_dtype


def _say_placement(model) -> None:
    import jax

    leaves = jax.tree.leaves(model.params)
    devices = set().union(*(leaf.sharding.device_set for leaf in leaves))
    kinds = sorted({str(leaf.dtype) for leaf in leaves})
    _LOG.info("the model's weights lie on %d device(s), in %s; it computes in %s", len(devices), " and ".join(kinds),
              model.config.dtype)


def _compilation_cache(args) -> None:
    from unitoken_jax.inference.compilation_cache import enable_compilation_cache

    where = enable_compilation_cache(args.compilation_cache)
    _LOG.info("compilation cache: %s", where or "off")


class _AfterPictures(argparse.Action):
    """understand's QUESTION, which also sets `inputs`: its pictures, then it (what the verb reads)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.inputs = [*namespace.images, values]


_whole = argtypes.whole


def _finite(least: float, *, above: bool = False, at_most: float | None = None):
    """An argparse type: a finite number of at least `least` (above it, with `above`; at most
    `at_most`), refused by its option before any model loads (a temperature of -1 had been refused
    as "temperature=-1.0" after the load)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < least or (above and value == least) or \
                (at_most is not None and value > at_most):
            highest = "" if at_most is None else f" and at most {at_most:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be a finite number "
                                             f"{'above' if above else 'of at least'} {least:g}{highest}")
        return value
    return parse


def _directory_option(option: str, path: str) -> None:
    """A directory option (written into, made if missing) that names a file, or a place where no
    directory or file can be made (/proc, a read-only mount), is refused before any work: found at
    the write, it came after reading a whole checkpoint, and named no option."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} is a file; give a directory")
    path = os.path.abspath(path)
    made = []  # the directories this check makes, removed again (the work makes them when it writes)
    try:
        parent = path
        while not os.path.exists(parent):
            made.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".unitoken-write-check-")
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{option} {path} cannot be written: {e.strerror or e}") from None
    finally:
        for directory in made:
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _more_than_zero(text: str) -> float:
    """An argparse type: a finite number above 0 (a size or a limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is out of range: it must be a number above 0")
    return value


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--image-prefix must be comma-separated token ids (e.g. 16853), got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"--size must look like 512x512, got {text!r}") from e
    if w <= 0 or h <= 0:
        raise ValueError(f"--size must be positive, got {text!r}")
    return w, h


def _numbered(out: str, i: int, n: int) -> str:
    if n == 1:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}_{i}{ext or '.png'}"


def _say_left_over(verb: str, out: str, n: int) -> None:
    """Says the numbered pictures beside --out that this run of n did not write (an earlier run's with
    a larger --n: `--n 2` over `--n 3`'s files rewrote _0 and _1 and left _2 to be read as this run's)."""
    stem, ext = os.path.splitext(out)
    folder, pattern = os.path.dirname(out) or ".", re.compile(re.escape(os.path.basename(stem)) + r"_(0|[1-9]\d*)" +
                                                               re.escape(ext or ".png") + "$")
    left = sorted((int(m.group(1)), os.path.join(os.path.dirname(out), name)) for name in os.listdir(folder)
                  if (m := pattern.match(name)) and (n == 1 or int(m.group(1)) >= n))
    if left:
        names = ", ".join(path for _, path in left[:3]) + (" ..." if len(left) > 3 else "")
        wrote = out if n == 1 else f"{_numbered(out, 0, n)} to {_numbered(out, n - 1, n)}"
        print(f"{verb}: {names}: left there by an earlier run ({len(left)} picture(s); this run wrote {wrote})",
              file=sys.stderr)


def _understand(args) -> int:
    *images, question = args.inputs
    if os.path.isfile(question):
        raise ValueError(f"the last argument is the question, and {question!r} is a file: give a question after the "
                         "pictures (unitoken understand IMAGE... QUESTION)")
    not_files = [i for i in images if not os.path.isfile(i)]
    if not_files:
        from PIL import Image

        from unitoken_jax.tokenizer.images import load_image

        missing = not_files[0]
        if os.path.isdir(missing) or os.sep in missing or \
                os.path.splitext(missing)[1].lower() in Image.registered_extensions():
            load_image(missing)  # a path: raises, saying what is wrong with it
        raise ValueError(f"{missing!r} is not a picture file. The arguments are IMAGE... QUESTION: the pictures, "
                         "then one question (several questions: the Python API's understand([...]) or chat)")
    _readable(images)
    pipe = _pipeline(args)
    shown = _Streamed()
    with _budget_notes() as caught:
        answer = pipe.understand(images, question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=shown)
    shown.end(answer)
    _say_notes("understand", caught)
    return 0


class _Streamed:
    """Prints an answer's text as it is generated (`head` before its first piece), and `end`
    prints the rest of the finished answer (all of it, under `head`, where nothing came)."""

    def __init__(self, head: str = ""):
        self.head, self.sent = head, ""

    def __call__(self, text: str) -> None:
        print(text if self.sent else self.head + text, end="", flush=True)
        self.sent += text

    def end(self, whole: str) -> None:
        if not self.sent:
            print(self.head + whole, flush=True)
        elif whole.startswith(self.sent):  # (pipeline: the answer's first part starts with what was streamed)
            print(whole[len(self.sent):], flush=True)
        else:  # (never seen: a decoding whose text is not built from its prefixes' texts)
            print(f"\n(all of it:) {whole}", flush=True)


@contextlib.contextmanager
def _budget_notes():
    """Collects the warnings of the block, so that an answer cut by its budget
    (`pipeline.AnswerCut`: a stopped text, a picture completed) is said after the answer
    (`_say_notes`)."""
    from unitoken_jax.inference.pipeline import AnswerCut

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnswerCut)
        yield caught


def _say_notes(verb: str, caught) -> None:
    """AnswerCut warnings as one plain line each on stderr; others as Python shows them."""
    from unitoken_jax.inference.pipeline import AnswerCut

    for warning in caught:
        if issubclass(warning.category, AnswerCut):
            said = str(warning.message).replace("answer 0: its", "the")
            # the hint that fits what stopped it (a chat fills the model's positions: more budget does nothing)
            hint = ("; --max-new-tokens sets the budget" if "max_new_tokens=" in said else
                    "; '/reset' starts a new conversation" if verb == "chat" else "")
            print(f"{verb}: {said}{hint}", file=sys.stderr, flush=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _share(items: list, args, what: str) -> list:
    """This process's share of a long job (`--process-index` of `--process-count`: the items whose
    position modulo the count is the index), as `pretokenize` splits its chunks over a pod's hosts."""
    count, index = args.process_count, args.process_index
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--process-index {index} of --process-count {count}: need 0 <= index < count")
    if count > 1:
        print(f"process {index} of {count}: {len(items[index::count])} of the {len(items)} {what}", file=sys.stderr)
    return items[index::count]


def _caption(args) -> int:
    """One question about each picture of the files and folders given, `--batch-size` at a time,
    into a list of conversations in the reference's format (what `unitoken pretokenize` reads,
    picture paths relative to the file). Pictures that cannot be read are listed and left out.
    A .jsonl file gets each batch's items as it finishes, and a rerun skips the pictures it has."""
    import json

    from PIL import Image
    from tqdm.auto import tqdm

    from unitoken_jax.inference.pipeline import AnswerCut
    from unitoken_jax.tokenizer.images import ImageError, load_image

    kind = os.path.splitext(args.out)[1].lower()
    question = f"<|image|>\n{args.question}"  # the item's first turn, as written below and checked on a rerun
    if kind not in (".json", ".jsonl"):
        raise ValueError(f"--out {args.out}: captions are written as a .json list or a .jsonl file of items")
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        raise ValueError(f"--out {args.out}: the directory {directory} does not exist (create it first)")
    if os.path.isdir(args.out):  # found only when the captions are written, they would be lost
        raise ValueError(f"--out {args.out} is a directory; give a file name such as "
                         f"{os.path.join(args.out, 'captions.jsonl')}")
    if isinstance(args.batch_size, bool) or args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    pictures = Image.registered_extensions()
    paths = []
    for given in args.inputs:
        if os.path.isdir(given):
            found = sorted(os.path.join(root, name) for root, names in _walk(given) for name in names
                           if os.path.splitext(name)[1].lower() in pictures)
            if not found:
                print(f"caption: {given} holds no picture files", file=sys.stderr)
            paths += found
        else:
            paths.append(given)
    seen = set()  # a picture named twice (itself and through its folder, or as ./x) is captioned once
    paths = [p for p in paths if not (os.path.realpath(p) in seen or seen.add(os.path.realpath(p)))]
    # an item's id is its picture's path without the extension, unless two pictures share it (a.png and
    # a.jpg: both items were "a", and the data pipeline's train / eval split goes by id): then with it
    stems = Counter(os.path.splitext(os.path.relpath(p, directory))[0] for p in paths)
    paths = _share(paths, args, "pictures")
    done = set()
    if kind == ".jsonl" and os.path.exists(args.out):  # a rerun goes on where the last one stopped
        kept, damaged, asked = [], 0, set()
        with open(args.out, "rb") as f:  # (a line cut inside a character is damaged, not the whole file)
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                    item = json.loads(line)
                    done.add(tuple(item["image"]))
                    asked.add(item["conversations"][0]["value"])
                    kept.append(line)
                except (ValueError, KeyError, TypeError, IndexError):  # (UnicodeDecodeError is a ValueError)
                    damaged += raw.strip() != b""
        other = sorted(q for q in asked if q != question)
        if other:  # (kept, the file would mix two questions' answers under one set of pictures)
            raise ValueError(f"{args.out} holds answers to another question ({other[0].split(chr(10), 1)[-1]!r}); "
                             "give that --question to go on, or another --out")
        if damaged:  # e.g. a line cut by a stop mid-write: dropped, its picture captioned again
            print(f"caption: {damaged} damaged line(s) of {args.out} dropped", file=sys.stderr)
        # (a last line without its newline, as an editor may leave it, would run into the next item)
        if damaged or (kept and not kept[-1].endswith("\n")):  # written whole, then renamed: a stop keeps them
            partial = f"{args.out}.{os.getpid()}.tmp"
            with open(partial, "w", encoding="utf-8") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
            os.replace(partial, args.out)
    todo = [p for p in paths if (os.path.relpath(p, directory),) not in done]
    readable = []
    # each picture read once before the model loads (a folder of thousands took minutes unsaid)
    for path in tqdm(todo, desc="reading pictures", unit="picture", leave=False, disable=len(todo) < 100):
        try:
            load_image(path)
        except ImageError as e:
            tqdm.write(f"caption: left out: {e}", file=sys.stderr)
        else:
            readable.append(path)
    if not todo and done:
        print(f"{args.out} holds the captions of all {len(paths)} pictures already")
        return 0
    if not readable and done:  # (a rerun whose pictures left are unreadable: said above, the job is done)
        print(f"{args.out} holds the captions of all {len(paths) - len(todo)} readable pictures already; "
              f"{len(todo)} left out")
        return 0
    if not readable:
        raise ValueError("no picture to caption: give picture files or folders that hold some")
    pipe = _pipeline(args)

    def items(batch, answers):
        def item_id(relative):
            stem = os.path.splitext(relative)[0]
            return relative if stems[stem] > 1 else stem

        return [{"id": item_id(os.path.relpath(path, directory)),
                 "image": [os.path.relpath(path, directory)],
                 "conversations": [{"from": "human", "value": question},
                                   {"from": "gpt", "value": answer.strip()}]} for path, answer in zip(batch, answers)]

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    written, cut = [], []
    lines = open(args.out, "a", encoding="utf-8") if kind == ".jsonl" else contextlib.nullcontext()
    with lines, tqdm(total=len(readable), unit="answer", desc="answers") as bar:
        for first in range(0, len(readable), args.batch_size):
            batch = readable[first:first + args.batch_size]
            with _budget_notes() as caught:
                answers = pipe.understand([[p] for p in batch], [args.question] * len(batch), **options)
            stopped = {i: where for w in caught if isinstance(w.message, AnswerCut) for i, where in w.message.answers}
            cut += [(batch[i], where) for i, where in sorted(stopped.items())]
            kept = [i for i in range(len(batch)) if i not in stopped]  # a cut caption is no training item
            done_now = items([batch[i] for i in kept], [answers[i] for i in kept])
            if kind == ".jsonl":  # each batch as it is done: a stop loses at most one batch
                lines.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in done_now)
                lines.flush()
            else:
                written += done_now
            bar.update(len(batch))
    if kind == ".json":
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(written, f, indent=1, ensure_ascii=False)
    for path, where in cut:  # named by picture, not by place in a batch
        print(f"caption: {path}: the answer stopped at {where} before its end: left out (--max-new-tokens sets "
              "the budget)", file=sys.stderr)
    left = len(todo) - len(readable) + len(cut)
    print(f"wrote {len(readable) - len(cut)} captions to {args.out}" + (f" ({left} picture(s) left out)" if left else "")
          + (f"; {len(paths) - len(todo)} were there from an earlier run" if done else ""))
    return 0


def _check_out(path: str) -> None:
    """Before any drawing: the output's directory exists, the path is not a directory, PIL writes its format,
    and a file can be made there."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"--out {path}: the directory {directory} does not exist (create it first)")
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a directory; give a file name such as {os.path.join(path, 'picture.png')}")
    import io

    from PIL import Image

    extension = os.path.splitext(path)[1].lower()
    # found after drawing, the picture would be lost: PIL reads some formats it cannot write (.psd,
    # .pcd), and has writers that take no colour picture (.xbm, .msp: 1-bit) or need a plugin (.h5)
    kind = Image.registered_extensions().get(extension)
    try:
        if kind not in Image.SAVE:
            raise OSError("no writer")
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=kind)
    except Exception:  # noqa: BLE001 - whatever the writer raises, the picture could not be written
        raise ValueError(f"--out {path}: {extension or 'no extension'} is not a format PIL writes colour pictures "
                         "in; use .png (or .jpg, .webp, ...)") from None
    existed = os.path.exists(path)
    try:  # a place that cannot take a file (/proc, a read-only mount, no permission) is found before the drawing
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ValueError(f"--out {path} cannot be written: {e.strerror or e}") from None
    if not existed:
        os.remove(path)


def _guided(args) -> None:
    """A negative prompt with --cfg 1 refused before the model loads (it was after, as "cfg=1")."""
    if args.negative_prompt is not None and args.cfg == 1:
        raise ValueError("--negative-prompt acts only through guidance, and --cfg 1 is none: give another --cfg "
                         "(3 by default) or leave the negative prompt out")


def _generate(args) -> int:
    _guided(args)
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give either a prompt or --prompts-file (one prompt a line)")
    if args.prompts_file is not None:
        return _generate_many(args)
    if (args.process_index, args.process_count) != (0, 1):
        raise ValueError("--process-index and --process-count split a --prompts-file over a pod's hosts; one prompt "
                         "is drawn by one process")
    _check_out(args.out)
    if not args.prompt.strip():  # allowed (a picture from the model's own prior), but likely a slip
        print("generate: the prompt is empty: the pictures are drawn without a caption", file=sys.stderr)
    pipe = _pipeline(args)
    pictures = pipe.generate_image(args.prompt, size=_size(args.size), cfg=args.cfg, n=args.n, seed=args.seed,
                                   top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                                   negative_prompt=args.negative_prompt, batch_size=args.batch_size)
    for i, picture in enumerate(pictures):
        path = _numbered(args.out, i, len(pictures))
        _save(picture, path)
        print(f"wrote {path}")
    _say_left_over("generate", args.out, len(pictures))
    _say_pixels(pictures[0], args.size, pipe, given=not getattr(args, "own_size", False))
    return 0


def _walk(folder: str):
    """(folder, file names) of `folder` and every folder under it, symlinked ones too (os.walk's
    default passed them over unsaid), each real folder once (a link to a parent loops no more)."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield root, names


def _first_undecodable_line(path: str) -> int:
    """The number (from 1) of the first line of `path` that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _generate_many(args) -> int:
    """--prompts-file: --n pictures for every line of the file into the directory --out
    (NNNNN_J.png, line N of the file from 0, blank lines counted; picture J), with index.json
    listing each prompt's line (from 1, as editors count), pictures and seeds. The
    pictures are written batch by batch; a rerun draws only the prompts whose pictures are not
    all there."""
    import json
    import socket

    from tqdm.auto import tqdm

    try:
        with open(args.prompts_file, encoding="utf-8-sig") as f:  # (-sig: a BOM, as Notepad writes, is no text)
            prompts = [line.strip() for line in f]
    except OSError as e:  # missing, a directory, unreadable: said before the model loads
        raise ValueError(f"--prompts-file {args.prompts_file}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:  # (its offset counts from the decoder's chunk: the line is found here)
        raise ValueError(f"--prompts-file {args.prompts_file} is not UTF-8 text ({e.reason} on line "
                         f"{_first_undecodable_line(args.prompts_file)})") from None
    if not any(prompts):
        raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt (one prompt a line)")
    blank = [i for i, p in enumerate(prompts) if not p]
    line = [i for i, p in enumerate(prompts) if p]  # each prompt's line of the file, from 0: its pictures' names
    prompts = [p for p in prompts if p]
    if blank:
        print(f"generate: {len(blank)} empty line(s) of {args.prompts_file} skipped", file=sys.stderr)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file: with --prompts-file, --out is the folder the pictures go to")
    from PIL import Image

    if not os.path.isdir(args.out) and os.path.splitext(args.out)[1].lower() in Image.registered_extensions():
        raise ValueError(f"--out {args.out} names a picture: with --prompts-file, --out is the folder the pictures "
                         "go to (made if it is not there)")
    batch_size = args.batch_size or 16
    if batch_size < 1 or args.n < 1:
        raise ValueError(f"--batch-size and --n must be at least 1, got {batch_size} and {args.n}")
    names = [[f"{line[k]:05d}_{j}.png" for j in range(args.n)] for k in range(len(prompts))]
    mine = _share(list(range(len(prompts))), args, "prompts")

    def on_disk(k):
        return all(os.path.exists(os.path.join(args.out, m)) for m in names[k])

    index_path = os.path.join(args.out, "index.json")
    listed = _read_index(index_path)
    # a prompt of this host's whose pictures are there but not in index.json was saved by a run stopped
    # before it listed them (killed between a batch's saves and its index): what they were drawn with is
    # not known, so they are drawn again (kept, they had been listed with this run's settings)
    unlisted = [k for k in mine if on_disk(k) and names[k][0] not in listed]
    if unlisted:
        print(f"generate: {len(unlisted)} prompt(s)' pictures in {args.out} are not in its index.json (a stopped "
              "run saved them before it listed them): drawn again", file=sys.stderr)
    todo = [k for k in mine if not on_disk(k) or k in unlisted]
    pipe = _pipeline(args) if todo else None  # (sets --size's default)
    drawn_with = dict(size=args.size, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                      temperature=args.temperature, negative_prompt=args.negative_prompt)
    # every picture in the folder, this host's and the other hosts' of a pod: one drawn otherwise is
    # refused, as the index would say it was drawn with this run's settings
    # (a prompt with some of its pictures there too, e.g. a rerun with a larger --n: they were replaced unsaid)
    before = _same_as_before(listed, args.out, {names[k][0]: (prompts[k], args.seed) for k in range(len(prompts))
                                                if k not in unlisted
                                                and os.path.exists(os.path.join(args.out, names[k][0]))}, drawn_with)
    options = dict(size=_size(args.size) if todo else None, cfg=args.cfg, n=args.n, seed=args.seed,
                   top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                   negative_prompt=args.negative_prompt,
                   progress=False)
    # every prompt the model cannot take, said before the first picture (it had stopped the job at its
    # batch, and a rerun at the same line, so the prompts after it were never drawn)
    refused = []
    if todo:  # the options first, with an empty prompt: an error then is theirs, not every line's
        pipe.generate_request("", size=options["size"], cfg=args.cfg, negative_prompt=args.negative_prompt)
    for k in todo:
        try:
            pipe.generate_request(prompts[k], size=options["size"], cfg=args.cfg, negative_prompt=args.negative_prompt)
        except ValueError as e:
            refused.append((line[k] + 1, e))
    if refused:
        lines = ", ".join(str(n) for n, _ in refused[:10]) + (" ..." if len(refused) > 10 else "")
        raise ValueError(f"--prompts-file {args.prompts_file}: the model cannot take the prompt(s) on line(s) "
                         f"{lines} ({refused[0][1]}); shorten or remove them")
    os.makedirs(args.out, exist_ok=True)  # (as chat's --out-dir; once the run is known: a refused one left it empty)

    def write_index() -> list[int]:
        """index.json of the pictures in the folder now (another host's prompts not drawn yet, or
        never: a host that failed, are left out, and listed by the host that writes the index after
        them), written whole, then renamed (the hosts of a pod that share the folder each write it;
        the temporary name is the host's own: PIDs repeat across hosts, 1 in a container)."""
        present = [k for k in range(len(prompts)) if on_disk(k) and (k not in waiting or k in drawn_now)]
        index = [{"prompt": prompts[k], "line": line[k] + 1, "pictures": names[k],
                  "seeds": [(args.seed + j) % 2**32 for j in range(args.n)],  # (as the pipeline wraps them)
                  # pictures kept from an earlier run: as that run drew them (its --size if this one loaded no model)
                  **{key: before.get(names[k][0], {}).get(key, value) if k not in todo else value
                     for key, value in drawn_with.items()}} for k in present]
        partial = os.path.join(args.out, f"index.json.{socket.gethostname()}.{args.process_index}.{os.getpid()}.tmp")
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1, ensure_ascii=False)
        os.replace(partial, os.path.join(args.out, "index.json"))
        return present

    per_batch = max(1, batch_size // args.n)  # whole prompts a batch: --n pictures each
    # this run's prompts are listed once this run has drawn them (an unlisted one on disk is not yet)
    waiting, drawn_now = set(todo), set()
    with tqdm(total=len(todo) * args.n, desc="pictures", unit="picture") as bar:
        try:
            for first in range(0, len(todo), per_batch):
                chosen = todo[first:first + per_batch]
                drawn = pipe.generate_image([prompts[k] for k in chosen], batch_size=batch_size, **options)
                for k, pictures in zip(chosen, drawn):
                    for name, picture in zip(names[k], pictures):
                        _save(picture, os.path.join(args.out, name))
                    drawn_now.add(k)
                bar.update(len(chosen) * args.n)
                # after each batch: a stopped run's pictures are listed with what they were drawn from, so
                # a rerun with other prompts or settings is refused (there was no index.json to compare with)
                write_index()
        except KeyboardInterrupt:  # the prompts of the stopped batch saved so far, listed (not drawn again)
            with contextlib.suppress(OSError):
                write_index()
            raise
    # then the folder is listed again: a host whose index landed after another's that had listed more
    # (it had drawn its last pictures meanwhile) writes it again, so the index written last lists every
    # picture drawn
    written = None
    while True:
        present = [k for k in range(len(prompts)) if on_disk(k) and (k not in waiting or k in drawn_now)]
        if present == written:
            break
        written = write_index()
    ours = {name for k in range(len(prompts)) for name in names[k]}  # (every host's: theirs may be on their way)
    stray = sorted(f for f in os.listdir(args.out) if f not in ours and f.endswith(".png") and f[:5].isdigit()
                   and f[5:6] == "_")
    if stray:  # (another --n or a shorter prompts file: index.json no longer lists them, unsaid)
        print(f"generate: {len(stray)} picture(s) in {args.out} are of no prompt and --n of this run ({', '.join(stray[:3])}"
              f"{' ...' if len(stray) > 3 else ''}): left there, not in index.json", file=sys.stderr)
    there = len(prompts[args.process_index::args.process_count]) - len(todo)
    print(f"wrote {len(todo) * args.n} pictures for {len(todo)} prompts to {args.out} (index.json lists them)"
          + (f"; {there} prompts' pictures were there from an earlier run" if there else ""))
    return 0


def _read_index(index_path: str) -> dict:
    """An earlier run's index.json by first picture's name ({} when there is none, or one of another
    kind: nothing to compare with)."""
    import json

    if not os.path.exists(index_path):
        return {}
    try:
        with open(index_path, encoding="utf-8") as f:
            return {entry["pictures"][0]: entry for entry in json.load(f)}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def _same_as_before(before: dict, folder: str, kept: dict[str, tuple[str, int]], drawn_with: dict) -> dict:
    """A rerun keeps the pictures already there (`kept`: first picture's name -> (prompt, seed)):
    refused if the earlier run's index (`before`, by first picture's name) says they were drawn from
    another prompt or with other settings, so that the new index.json does not describe pictures it
    did not make. Returns `before`."""
    for name, (prompt, seed) in kept.items():
        entry = before.get(name)
        if entry is None:
            continue
        was = {"prompt": entry.get("prompt"), "seed": (entry.get("seeds") or [None])[0],
               **{k: entry[k] for k in drawn_with if k in entry}}
        # (--size unset and nothing to draw: no model loaded to give its default, nothing to compare)
        now = {"prompt": prompt, "seed": seed, **{k: v for k, v in drawn_with.items() if k in entry
                                                   and not (k == "size" and v is None)}}
        changed = [k for k in now if was[k] != now[k]]
        if changed:
            raise ValueError(f"{folder} holds {name} drawn with {changed[0]}={was[changed[0]]!r}, "
                             f"not {now[changed[0]]!r}: draw into another folder, or delete the pictures to draw "
                             "them again")
    return before


def _readable(paths) -> None:
    """Each picture opened and decoded before the model loads (a 7B takes long to load): one
    that cannot be is refused at once, by path (`load_image`'s errors)."""
    from unitoken_jax.tokenizer.images import load_image

    for path in paths:
        load_image(path)


def _edit(args) -> int:
    # a second picture had been taken as the instruction ("blue.png"), or refused as "unrecognized arguments"
    files = [x for x in (args.instruction, *args.more) if os.path.isfile(x)]
    if files:
        raise ValueError(f"an edit takes one picture, then its instruction: {files[0]!r} is a file (unitoken edit "
                         "IMAGE INSTRUCTION)")
    if args.more:
        raise ValueError(f"the instruction is one argument: quote it (unitoken edit {args.image} "
                         f"\"{' '.join((args.instruction, *args.more))}\")")
    _guided(args)
    _check_out(args.out)
    _readable([args.image])
    if not args.instruction.strip():  # allowed (the picture redrawn as the model sees fit), but likely a slip
        print("edit: the instruction is empty: the picture is redrawn without one", file=sys.stderr)
    pipe = _pipeline(args)
    pictures = pipe.edit(args.image, args.instruction, size=_size(args.size), cfg=args.cfg, seed=args.seed,
                         n=args.n, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                         negative_prompt=args.negative_prompt, batch_size=args.batch_size)
    for i, picture in enumerate(pictures if args.n > 1 else [pictures]):
        path = _numbered(args.out, i, args.n)
        _save(picture, path)
        print(f"wrote {path}")
    _say_left_over("edit", args.out, args.n)
    _say_pixels(picture, args.size, pipe, given=not getattr(args, "own_size", False))
    return 0


_OWN_SIZE = ("a model trained here: the size of its training pictures' code grid (trained_pictures.json); else "
             "512x512")


def _say_pixels(picture, size: str, pipe, given: bool) -> None:
    """Says where a picture's pixels are not --size: --size counts the release VQ-GAN's 16 px a
    code (32 px a grid unit of 2 codes), and a VQ-GAN of another downsampling draws the same grid
    larger or smaller (the demo's, 4 px a code: --size 128x128 is 8 x 8 codes, 32 x 32 pixels)."""
    from unitoken_jax.inference.pipeline import vq_factor

    asked = _size(size)
    if hasattr(picture, "size") and tuple(picture.size) != asked:
        said = "the model's own size" if given is False else "--size"
        print(f"(the picture is {picture.size[0]}x{picture.size[1]} pixels: {said} {size} counts 16 px a code, as "
              f"the release's VQ-GAN draws them, and this VQ-GAN draws {vq_factor(pipe.vq)})", file=sys.stderr)


def _save(picture, path):
    import numpy as np
    from PIL import Image

    if not isinstance(picture, Image.Image):
        raise ValueError(f"the VQ-GAN could not draw the codes (shape {np.shape(picture)}): it has no decoder")
    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if kind is None:  # (PIL's own error names the extension)
        picture.save(path)
        return
    # written whole, then renamed: a stop mid-write leaves no cut picture that a rerun counts as drawn
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        picture.save(partial, format=kind)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _chat(args) -> int:
    """Reads user turns from stdin; '/image PATH' attaches a picture to the next turn, '/draw
    CAPTION' asks for a picture in the model's generation prompt (`generate`'s, at --size: a
    line cannot hold its newline). A picture that cannot be read, or a turn the model cannot take
    (e.g. past its length), is reported and left out, and the conversation goes on."""
    import numpy as np
    from PIL import Image

    from unitoken_jax.inference.decode import OptionError, Request
    from unitoken_jax.tokenizer import layout
    from unitoken_jax.tokenizer.conversation import IMAGE_PLACEHOLDER, SequenceTooLong
    from unitoken_jax.tokenizer.images import ImageError, load_image

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p)
    try:  # bad options end the chat before it starts, named as the flags are
        Request(np.zeros(1, np.int32), **options, cfg_scale=args.cfg)
    except OptionError as e:
        raise e.renamed("--" + {"cfg_scale": "cfg"}.get(e.option, e.option).replace("_", "-")) from None
    options["cfg"] = args.cfg
    _directory_option("--out-dir", args.out_dir)  # (before the model loads)
    pipe = _pipeline(args)
    width, height = _size(args.size)
    if width % layout.PIXELS_PER_GRID or height % layout.PIXELS_PER_GRID:
        raise ValueError(f"--size {args.size}: '/draw' asks for sizes in multiples of {layout.PIXELS_PER_GRID} "
                         "pixels each way")
    # a picture is kept as it was read or drawn (a file changed or moved later does not change the
    # conversation); `pending`: (path, picture) attached for the next message
    messages, images, pending = [], [], []
    os.makedirs(args.out_dir, exist_ok=True)
    # pictures are numbered on from an earlier chat's in the folder, never written over them (nor
    # over those of another chat writing there at the same time: each name is taken as it is written)
    earlier = [f[len("chat_"):-len(".png")] for f in os.listdir(args.out_dir) if f.startswith("chat_")
               and f.endswith(".png")]
    drawn = max((int(n) + 1 for n in earlier if n.isdigit()), default=0)
    help_text = (f"chat: type a message; '/image PATH' attaches a picture to the next one; '/draw CAPTION' asks for "
                 f"a {width}x{height} picture of it; '/reset' starts a new conversation; '/help' shows this; a "
                 "message that starts with '/' is typed '//...'; an empty line or EOF ends.")
    print(help_text, file=sys.stderr)
    for number, line in enumerate(sys.stdin):
        line = line.rstrip("\r\n")  # (a file written on Windows ends its lines with \r\n)
        if number == 0:
            line = line.removeprefix("\ufeff")  # (and Notepad starts it with a byte-order mark)
        if not line:
            break
        if not line.strip():  # (spaces alone: likely a slip, not a message, nor the end)
            print("chat: a line of spaces alone is not sent (an empty line ends)", file=sys.stderr, flush=True)
            continue
        command, rest = (line.split(None, 1) + [""])[:2] if line.startswith("/") else (line, "")
        if command == "/image":
            path = _typed_path(rest.strip())
            if not path:
                print("chat: '/image' needs the path of a picture", file=sys.stderr, flush=True)
                continue
            try:
                pending.append((path, load_image(path)))
            except ImageError as e:
                print(f"chat: not attached: {e}", file=sys.stderr, flush=True)
            continue
        if command == "/help":
            print(help_text, file=sys.stderr, flush=True)
            continue
        if command == "/reset":  # the model stays loaded (and its programs compiled); attached pictures stay
            messages, images = [], []
            kept = f"; {len(pending)} attached picture(s) go with its first message" if pending else ""
            print(f"chat: a new conversation{kept}", file=sys.stderr, flush=True)
            continue
        if command == "/draw":
            if not rest.strip():
                print("chat: '/draw' needs a caption (nothing sent)", file=sys.stderr, flush=True)
                continue
            line = pipe.generate_template.format(w=width, h=height, prompt=rest.strip())
        elif line.startswith("/") and not line.startswith("//"):  # not sent to the model as a message
            print(f"chat: unknown command {command!r} (nothing sent); a message that starts with '/' is typed "
                  "'//...'", file=sys.stderr, flush=True)
            continue
        else:
            line = line[1:] if line.startswith("//") else line
        if IMAGE_PLACEHOLDER in line:  # (counted as a picture's place: the turn was refused, its pictures dropped)
            kept = f"; the {len(pending)} attached picture(s) stay attached" if pending else ""
            print(f"chat: a message cannot hold {IMAGE_PLACEHOLDER!r}, the mark of a picture's place (attach "
                  f"pictures with '/image PATH'): nothing sent{kept}", file=sys.stderr, flush=True)
            continue
        # the pictures, a newline, the text: as `understand` and the server write a question about pictures
        # (without the newline the same question was another prompt, and drew another answer)
        messages.append({"from": "human", "value": IMAGE_PLACEHOLDER * len(pending) + ("\n" if pending else "") + line})
        images += [picture for _, picture in pending]
        shown = _Streamed("assistant: ")
        try:
            # (a turn's seed: --seed plus the messages before it, wrapped; the first turn's is --seed, as understand's)
            with _budget_notes() as caught:
                parts = pipe.chat(messages, images, seed=(args.seed + len(messages) - 1) % 2**32, stream=shown,
                                  **options)
        except ValueError as e:
            dropped = f" with its {len(pending)} attached picture(s)" if pending else ""
            full = ("; '/reset' starts a new conversation" if len(messages) > 1 and isinstance(e, SequenceTooLong)
                    else "")
            print(f"chat: that turn is left out{dropped}: {e}{full}", file=sys.stderr, flush=True)
            messages.pop()
            del images[len(images) - len(pending):]
            pending = []
            continue
        pending = []
        said, reply = [], []
        for part in parts:
            if isinstance(part, str):
                said.append(part)
                reply.append(part)
            elif isinstance(part, Image.Image):
                path, drawn = _save_drawn(part, args.out_dir, drawn)
                said.append(f"[picture: {path}]" if path else "[picture: not saved]")
                reply.append("<|image|>")
                images.append(part)
        shown.end("".join(said))
        _say_notes("chat", caught)
        messages.append({"from": "gpt", "value": "".join(reply)})
    if pending:
        print(f"chat: ended with {len(pending)} attached picture(s) no message took: "
              f"{', '.join(path for path, _ in pending)}", file=sys.stderr, flush=True)
    return 0


def _typed_path(path: str) -> str:
    """A path as a person types or drags it into a terminal: in quotes, with backslash-escaped
    spaces, or from ~ (the command line's arguments had these undone by the shell; a chat line not)."""
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        path = path[1:-1]
    elif "\\ " in path:
        path = path.replace("\\ ", " ")
    return os.path.expanduser(path)


def _save_drawn(picture, folder: str, drawn: int) -> tuple[str | None, int]:
    """(path, next number): a chat's drawn picture saved as FOLDER/chat_N.png, N from `drawn` on,
    never over another's (each name taken as it is made), written whole then renamed (a full disk
    had left a cut picture under the name); a picture that cannot be saved is said, and the chat
    goes on (None), where any error had ended it."""
    while True:
        path = os.path.join(folder, f"chat_{drawn}.png")
        drawn += 1
        taken = False
        try:
            with open(path, "xb"):  # the name, taken
                taken = True
            _save(picture, path)  # (whole, then renamed over the name taken)
            return path, drawn
        except OSError as e:
            if not taken and isinstance(e, FileExistsError):  # another's: the next number
                continue
            if taken:
                with contextlib.suppress(OSError):
                    os.remove(path)
            print(f"chat: the picture was not saved: {path}: {e.strerror or e}", file=sys.stderr, flush=True)
            return None, drawn


def _serve(args) -> int:
    from unitoken_jax.serve import ServeSettings, bind, run

    bundled = not (args.model or os.environ.get("UNITOKEN_MODEL"))
    # an option of the other batching was read by nothing (said, not ignored)
    other = {"static": ("--slot-length", "--slot-chunk"), "continuous": ("--chunk",)}[args.batching]
    given = [flag for flag in other if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --batching "
                         f"{'continuous' if args.batching == 'static' else 'static'}, not {args.batching}")
    args.chunk = 64 if args.chunk is None else args.chunk
    args.slot_chunk = 16 if args.slot_chunk is None else args.slot_chunk
    body = args.max_body_mb * 1024 * 1024
    settings = ServeSettings(api_key=args.api_key or os.environ.get("UNITOKEN_API_KEY") or None,
                             max_batch=args.max_batch, queue_limit=args.queue_limit, timeout=args.timeout,
                             batch_wait=args.batch_wait, max_body_bytes=int(body) if math.isfinite(body) else body,
                             batching=args.batching, slot_length=args.slot_length, chunk=args.chunk,
                             slot_chunk=args.slot_chunk, cors_origins=tuple(args.cors_origin))
    # (checked as it is made: before the model loads; and so is the address, bound here)
    sock = bind(args.host, args.port)
    try:
        pipe = _pipeline(args)  # sets args.size where none was given: the model's own (`pipe.default_size`)
        size = _size(args.size)
        name = args.model_name or ("unitoken-shapes" if bundled else
                                   os.path.basename(os.path.normpath(args.model or os.environ["UNITOKEN_MODEL"])))
        settings = dataclasses.replace(settings, model_name=name, default_size=size,
                                       sizes=(size,) if bundled else None)
        settings.validate(pipe.model.config.decoder.max_position_embeddings)  # (before it says it serves)
        _say_default_size_fits(pipe, size)
    except BaseException:
        sock.close()
        raise
    key = "API key required" if settings.api_key else "no API key"
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({key})", flush=True)
    run(pipe, settings, host=args.host, port=args.port, sock=sock)
    return 0


def _say_default_size_fits(pipe, size: tuple[int, int]) -> None:
    """Says at the start where the size of an image call that gives none (OpenAI's clients give
    none by default) does not fit the model beside a short prompt: every such call would be refused."""
    from unitoken_jax.inference.pipeline import PictureTooLarge

    try:
        pipe.generate_request("a picture", size=size)
    except PictureTooLarge as e:
        print(f"serve: image calls without a size draw {size[0]}x{size[1]}, which this model cannot hold "
              f"({e}); give --size {e.fits[0]}x{e.fits[1]} or smaller", file=sys.stderr, flush=True)


def _pretokenize(args) -> int:
    from unitoken_jax.data import pretokenize as pt

    # the settings first: a name or size they refuse is said before the tokenizers load
    demo = args.tokenizer == "demo"  # the demo's small VQ-GAN and tiles, unless sizes are given
    settings = pt.PretokenizeSettings(name=args.name, split=args.split,
                                      vq_size=args.vq_size or (32 if demo else 512),
                                      siglip_size=args.siglip_size or (56 if demo else 384), patch=args.patch,
                                      anyres=args.anyres,
                                      max_length="auto" if args.max_length is None else args.max_length or None,
                                      chunk_size=args.chunk_size,
                                      vq_batch=args.vq_batch)
    if args.tokenizer == "demo" or args.vqgan == "demo":
        if not (args.tokenizer == args.vqgan == "demo"):
            raise ValueError("--tokenizer demo and --vqgan demo go together (the demo's small tokenizers)")
        from unitoken_jax.data.demo import demo_tokenizers

        text, vq = demo_tokenizers()
    else:
        from unitoken_jax.tokenizer.text import TextTokenizer
        from unitoken_jax.vq_tokenizer import VQTokenizer

        if not args.tokenizer or not args.vqgan:
            # (the demo's were named only in --help)
            raise ValueError("pass --tokenizer text_tokenizer.json and --vqgan (Meta's vqgan.ckpt or an HF "
                             "Chameleon/UniToken directory), or --tokenizer demo --vqgan demo for the demo's small "
                             "ones (what configs/stage2.py:tiny trains on)")
        text = TextTokenizer.from_file(args.tokenizer)
        vq = VQTokenizer.load(args.vqgan)
    result = pt.pretokenize(args.items, args.out, text, vq, settings, image_root=args.image_root,
                            process_index=args.process_index, process_count=args.process_count)
    if result["complete"]:
        # each kind's count: edit pairs written as something else (both pictures in the question: understanding)
        kinds = result.get("kinds") or {}
        each = f" ({kinds['understanding']} understanding: answered in words, {kinds['generation']} generation: a " \
            "picture drawn, an edit's too)" if set(kinds) == {"understanding", "generation"} else ""
        print(f"{args.out}: {result['written']} items written{each}, {result['skipped']} skipped "
              f"(listed in {result['bad_items']})")
        if not result["written"]:
            print(f"unitoken pretokenize: error: no item of {args.items} could be used; the reasons are in "
                  f"{result['bad_items']}", file=sys.stderr)
            return 1
    elif result.get("finalizing"):
        print(f"{args.out}: every chunk is done and another process is writing the dataset's metadata (its lock is "
              f"{os.path.join(args.out, pt._PARTIAL, 'finalize.lock')}; a lock whose process is gone on this host is "
              "taken over by a rerun)")
    else:
        print(f"{args.out}: this process's chunks are done; {result['chunks_done']} of {result['chunks']} chunks "
              "finished in all (the last process to finish writes the dataset's metadata)")
    return 0


def _train(args) -> int:
    from unitoken_jax.train.__main__ import run

    run(["unitoken train", *args.absl_flags], as_program=getattr(args, "as_program", False))
    return 0


def _sweep(args) -> int:
    from unitoken_jax import sweep
    from unitoken_jax.train.config import TrainConfig

    mode = "local" if args.run_locally else "summary" if args.summary_only else "print"
    return sweep.main(args.config, args.root, mode=mode, launcher=args.launcher, fixed=args.set, as_json=args.json,
                      check=TrainConfig.from_config_dict)  # a run the train command would stop: refused here


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default where it says something: not None or False, whose meaning the
    help text gives (a "(default: None)" after "default: the checkpoint's own" only confused)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unitoken", description="UniToken in JAX/Flax")
    parser.add_argument("--version", action="version", version=f"unitoken-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # every page shows its defaults; no abbreviated options (`chat --image x` would be taken for
    # --image-prefix)
    add_parser = functools.partial(sub.add_parser, formatter_class=_HelpFormatter, allow_abbrev=False)
    convert = add_parser("convert", help="HF safetensors layout <-> our Orbax checkpoint (direction from --from)")
    convert.add_argument("--from", dest="src", required=True, help="an HF-format dir, or one of our Orbax dirs")
    convert.add_argument("--to", dest="dst", required=True, help="output directory")
    convert.add_argument("--dtype", default=None, choices=DTYPES[1:],
                         help="dtype to store (default: the source's own, so the conversion is lossless)")
    convert.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                         help="int8: store weight-only int8 (our Orbax format only), so later loads need no "
                              "quantizing")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace the checkpoint --to holds (refused without it: an int8 conversion over the "
                              "float weights cannot be undone)")
    convert.add_argument("--max-shard-gb", type=_more_than_zero, default=None,
                         help="largest safetensors file written (and held in memory) when writing the HF layout "
                              f"(Orbax -> HF; default {SHARD_BYTES / 1024**3:g})")
    convert.set_defaults(func=_convert)
    init = add_parser("init", help="write a randomly initialised model in the HF layout")
    init.add_argument("--config", default="tiny",
                      help="a model config: 'tiny', '7b', '7b_anyres', or FILE.py[:ARG] with get_config(arg).model")
    init.add_argument("--to", dest="dst", required=True, help="output directory")
    init.add_argument("--seed", type=_whole(0, 2**32 - 1), default=0,
                      help="initialisation seed, as the sampling verbs take one: the same seed, the same weights")
    init.add_argument("--dtype", default="float32", choices=DTYPES[1:], help="dtype of the written tensors")
    init.add_argument("--overwrite", action="store_true",
                      help="replace the checkpoint --to holds (refused without it: random weights over a model's)")
    init.set_defaults(func=_init)
    recon = add_parser("reconstruct", help="image -> VQ codes -> image: the tokenizer at work on a photo")
    recon.add_argument("image")
    recon.add_argument("--out", required=True, help="where to write the reconstruction (its extension picks the "
                                                    "format: .png, .jpg, .webp, ...)")
    recon.add_argument("--vqgan", default=None, help="Meta's vqgan.ckpt (vqgan.yaml beside it), a VQ-GAN directory this "
                                                     "package wrote, or an HF Chameleon / UniToken dir; default "
                                                     "$UNITOKEN_VQGAN, else the bundled shapes-world VQ-GAN")
    recon.add_argument("--size", type=_whole(1), default=None,
                       help="crop side in pixels (a multiple of the VQ-GAN's downsampling, 16 for Chameleon's; "
                            "default 512, 64 with the bundled VQ-GAN)")
    recon.add_argument("--side-by-side", action="store_true", help="write the crop and its reconstruction together")
    recon.set_defaults(func=_reconstruct)

    def cache_arg(p):
        p.add_argument("--compilation-cache", default=None, metavar="DIR",
                       help="where compiled programs are kept for the next call ('off': none; default "
                            "$UNITOKEN_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, else "
                            "~/.cache/unitoken_jax/xla)")

    cache_arg(recon)

    def template_arg(p):
        p.add_argument("--template", default=None,
                       help="the prompt a picture is asked for with: {prompt}, and optionally {w} and {h} (its "
                            "width and height), filled in (default: the one the model's trained_pictures.json "
                            "records, as the bundled model's does; else the reference's). A model trained with "
                            "another wording needs it")

    def model_args(p, image_out=False, per_request=True):
        p.add_argument("--model", help="HF or Orbax checkpoint dir (default $UNITOKEN_MODEL, else the bundled "
                                       "shapes-world model)")
        p.add_argument("--tokenizer", help="Chameleon's text_tokenizer.json (default $UNITOKEN_TOKENIZER; 'demo': "
                                           "the demo's, with --vqgan demo, for a model trained on demo data)")
        p.add_argument("--vqgan", help="Meta's vqgan.ckpt (vqgan.yaml beside it), a VQ-GAN directory this package "
                                       "wrote, or an HF Chameleon / UniToken dir, as given or converted (default "
                                       "$UNITOKEN_VQGAN; 'demo': the demo's)")
        p.add_argument("--anyres", action="store_true", default=None,
                       help="lay out SigLIP features the AnyRes way (default: as a trained model's data did, where its "
                            "final/ records it; else not)")
        p.add_argument("--vq-size", type=_whole(1), default=None,
                       help="side of the VQ crop of input pictures (default: the crop a trained model's data "
                            "used, where its final/ records it; else 512, or less for a model too short for 512 px of "
                            "codes)")
        p.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="compute dtype (auto: bfloat16 on a TPU or GPU, float32 on a CPU)")
        p.add_argument("--param-dtype", default="auto", choices=DTYPES,
                       help="dtype the weights are held in (auto: the compute dtype); --quantize int8 holds the "
                            "matmul kernels in int8 and the rest in this")
        p.add_argument("--quantize", choices=("auto",) + QUANTIZE_MODES, default="auto",
                       help="weight format: int8 quantizes every matmul kernel as it loads (about half the "
                            "memory of bfloat16); none: the checkpoint's floats; auto: the checkpoint's own, "
                            "or int8 where bfloat16 weights and this command's pictures at once do not fit the "
                            "chips' memory (on a CPU: the checkpoint's own)")
        p.add_argument("--adapters", default=None,
                       help="LoRA adapters in PEFT's format (a fine-tuning run's WORKDIR/adapters) for the model, "
                            "merged into it as it loads")
        p.add_argument("--image-prefix", default=None,
                       help="comma-separated ids put before <racm3:break> when asking for a picture "
                            "(default: the reference's 16853 where the model's vocabulary has it, else none; '' for "
                            "none)")
        p.add_argument("--cache-growth", type=_whole(1), default=None,
                       help="on a CPU: grow the KV cache this many slots at a time (e.g. 128; default: as many "
                            "sizes as doubling from 256 would take, evenly spaced): fewer unfilled slots read a "
                            "step (-2 to +4 %% at 16 rows, measured), more compiles the first time a batch "
                            "shape comes (benchmarks/results/decode.md); unrolled layers only")
        p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto",
                       help="how the decode loop runs the layer stack: unrolled keeps its own copy of the layer "
                            "weights and compiles once per cache size; on an H200 a 7B step took a third of the "
                            "scanned one's time (benchmarks/results/decode_accel.md). auto: unrolled for float "
                            "weights on a CPU or on one GPU with twice that copy free, scanned otherwise")
        p.add_argument("--mesh", default="auto",
                       help="the devices of this host the model runs on: 'auto' (on a host of several accelerator "
                            "chips, all of them, split the tensor-parallel way as far as the heads divide; else "
                            "one), 'one', or DATA,FSDP,TENSOR (e.g. 1,4,2; one may be -1 for the rest: "
                            "--mesh=-1,1,1)")
        cache_arg(p)
        if not per_request:  # a server: every call brings its own seed, size and sampling options
            return
        p.add_argument("--seed", type=_whole(0, 2**32 - 1), default=0,
                       help="sampling seed: the same seed, the same output")
        if image_out:
            p.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels at 16 a code, multiples of 32 "
                                                        "(default: the bundled model's 64x64; " + _OWN_SIZE + ")")
            p.add_argument("--cfg", type=_finite(0), default=3.0, help="classifier-free guidance scale (1 = off)")
            p.add_argument("--top-k", type=_whole(0, 2**31 - 1), default=2000,
                           help="each image code is drawn from the k likeliest (0: from all)")
            p.add_argument("--top-p", type=_finite(0, above=True, at_most=1), default=1.0,
                           help="each image code is drawn from the likeliest whose probabilities sum to p (1: all)")
            p.add_argument("--temperature", type=_finite(0), default=1.0,
                           help="image-code sampling temperature (0: the likeliest code, greedy)")
        else:
            p.add_argument("--max-new-tokens", type=_whole(1), default=256, help="the longest answer, in tokens")
            p.add_argument("--temperature", type=_finite(0), default=0.0, help="0 = greedy")
            p.add_argument("--top-k", type=_whole(0, 2**31 - 1), default=0,
                           help="with --temperature: each token drawn from the k likeliest (0: from all)")
            p.add_argument("--top-p", type=_finite(0, above=True, at_most=1), default=1.0,
                           help="with --temperature: each token drawn from the likeliest whose probabilities sum "
                                "to p (1: all)")

    und = add_parser("understand", help="answer a question about pictures")
    # two positionals, not one list: the usage line reads IMAGE [IMAGE ...] QUESTION (one list's read as
    # several image-and-question pairs); `main` parses them intermixed with the options
    und.add_argument("images", nargs="+", metavar="IMAGE", help="picture files, all asked about in the one question")
    und.add_argument("question", metavar="QUESTION", help="the question, after the pictures", action=_AfterPictures)
    model_args(und)
    und.set_defaults(func=_understand)
    gen = add_parser("generate", help="draw pictures from a text prompt")
    gen.add_argument("prompt", nargs="?", default=None, help="what to draw (or --prompts-file)")
    gen.add_argument("--out", required=True, help="PNG path (numbered when --n > 1); with --prompts-file a directory")
    gen.add_argument("--n", type=_whole(1), default=1, help="pictures to draw a prompt")
    gen.add_argument("--prompts-file", default=None,
                     help="a text file of prompts, one a line: --n pictures each, into the directory --out "
                          "(NNNNN_J.png and index.json)")
    share_help = "with --process-count N: this process's share (every N-th {}, from this one), one process a host"
    count_help = "processes sharing the work, each run with its own --process-index (one a host of a pod)"
    gen.add_argument("--process-index", type=_whole(0), default=0, help=share_help.format("prompt of --prompts-file"))
    gen.add_argument("--process-count", type=_whole(1), default=1, help=count_help)
    gen.add_argument("--batch-size", type=_whole(1), default=None,
                     help="pictures a batch (default: all of one prompt's at once; 16 with --prompts-file)")
    gen.add_argument("--negative-prompt", default=None,
                     help="text guidance steers away from: the unguided row's prompt (default: no text, as "
                          "the reference's)")
    model_args(gen, image_out=True)
    template_arg(gen)
    gen.set_defaults(func=_generate)
    cap = add_parser("caption", help="answer one question about every picture of files and folders, in batches",
                     description="Answers --question about each picture (folders are searched for picture files) "
                                 "--batch-size at a time, and writes the conversations in the reference's format, "
                                 "which `unitoken pretokenize` reads (picture paths relative to the file): a .json "
                                 "list at the end, or a .jsonl file batch by batch, which a rerun continues. "
                                 "Pictures that cannot be read are listed on stderr and left out.")
    cap.add_argument("inputs", nargs="+", metavar="PICTURE_OR_FOLDER", help="picture files and folders of them")
    cap.add_argument("--out", required=True, help="the .json file to write, or a .jsonl file to add to (resumable)")
    cap.add_argument("--question", default="Describe the picture.", help="asked about every picture")
    cap.add_argument("--batch-size", type=_whole(1), default=16, help="pictures a batch")
    cap.add_argument("--process-index", type=_whole(0), default=0,
                     help=share_help.format("picture") + " and its own --out")
    cap.add_argument("--process-count", type=_whole(1), default=1, help=count_help)
    model_args(cap)
    cap.set_defaults(func=_caption)
    edi = add_parser("edit", help="draw a new picture from a picture and an instruction")
    edi.add_argument("image", help="the picture file to edit")
    edi.add_argument("instruction", help="what to change, in one quoted argument")
    edi.add_argument("more", nargs="*", help=argparse.SUPPRESS)  # (refused by name: a second picture, unquoted words)
    edi.add_argument("--negative-prompt", default=None,
                     help="text guidance steers away from (as generate's; Python's edit and the server's take it)")
    edi.add_argument("--out", required=True, help="PNG path (numbered when --n > 1)")
    edi.add_argument("--n", type=_whole(1), default=1, help="edits to draw (seeds --seed, --seed + 1, ...)")
    edi.add_argument("--batch-size", type=_whole(1), default=None, help="edits a batch (default: all --n at once)")
    model_args(edi, image_out=True)
    edi.set_defaults(func=_edit)
    cha = add_parser("chat", help="a multi-turn conversation on stdin, pictures in and out",
                     description="A conversation on stdin: each line is a turn; a line '/image PATH' attaches "
                                 "that picture to the next turn, '/draw CAPTION' asks for a picture of the "
                                 "caption (the generation prompt, at --size), '/reset' starts over, '/help' lists "
                                 "the commands; an empty line or EOF ends it. Pictures the model draws are written to --out-dir. "
                                 f"--max-new-tokens defaults to {CHAT_MAX_NEW_TOKENS} here (a 512x512 picture "
                                 "takes 1,060).")
    cha.add_argument("--out-dir", default=".", help="where drawn pictures are written")
    cha.add_argument("--size", default=None, help="WIDTHxHEIGHT that '/draw' asks for (default: the bundled "
                                                  "model's 64x64; " + _OWN_SIZE + ")")
    cha.add_argument("--cfg", type=_finite(0), default=3.0, help="classifier-free guidance for a picture an answer "
                                                            "draws, from its <racm3:break> on (1 = off)")
    model_args(cha)
    template_arg(cha)
    # the pipeline's chat budget (room for a 512 x 512 picture): with the bundled model's 512 positions
    # every turn then ends at the model's last position, so turns share the decode loop's shapes (README)
    cha.set_defaults(func=_chat, max_new_tokens=CHAT_MAX_NEW_TOKENS)
    srv = add_parser("serve", help="an OpenAI-compatible HTTP server (chat with pictures, images generations and "
                                   "edits), batching concurrent calls")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (another than 127.0.0.1 opens the "
                                                         "server to the network: set an API key)")
    srv.add_argument("--port", type=_whole(1, 65535), default=8000, help="the port to listen on")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but "
                                                     "/health (default $UNITOKEN_API_KEY; none: open)")
    srv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="let web pages from ORIGIN (e.g. http://localhost:3000; '*': any) call the API from a "
                          "browser; repeat for several (default: none, the server's own page needs none)")
    srv.add_argument("--model-name", default=None, help="the model's id in /v1/models and requests (default: "
                                                        "unitoken-shapes for the bundled model, else the --model "
                                                        "directory's name)")
    srv.add_argument("--max-batch", type=_whole(1), default=16,
                     help="rows decoding at once (a guided picture takes two; with --batching static, batches "
                          "are padded to powers of two)")
    srv.add_argument("--batching", choices=("static", "continuous"), default="static",
                     help="static: waiting calls run together, a batch to its end; continuous: calls join and leave "
                          "the running rows between chunks of steps (a question does not wait for a long answer)")
    srv.add_argument("--slot-length", type=_whole(2), default=None,
                     help="with --batching continuous: positions each row's cache holds, prompt and answer "
                          "(default: all the model has; shorter is faster, and longer calls are refused)")
    srv.add_argument("--chunk", type=_whole(1), default=None,
                     help="with --batching static: decoding steps between the loop's returns to the host, when "
                          "streams get their new text (fewer: smoother streams, a little more overhead; default 64)")
    srv.add_argument("--slot-chunk", type=_whole(1), default=None,
                     help="with --batching continuous: steps between admitting calls and streaming new text "
                          "(default 16)")
    srv.add_argument("--queue-limit", type=_whole(1), default=64, help="calls that may wait; one more gets 429")
    srv.add_argument("--timeout", type=_finite(0, above=True), default=600.0,
                     help="seconds a call may take, waiting included; then 504")
    srv.add_argument("--batch-wait", type=_finite(0), default=0.0,
                     help="seconds without a new call before a batch starts (lets a burst run as one batch)")
    srv.add_argument("--max-body-mb", type=_finite(0, above=True), default=32.0, help="larger request bodies get 413")
    srv.add_argument("--size", default=None, help="pictures' size when a call gives none or 'auto' (default: the "
                                                  "bundled model's 64x64, the only size it draws; " + _OWN_SIZE + ")")
    model_args(srv, per_request=False)
    template_arg(srv)
    srv.set_defaults(func=_serve)
    pre = add_parser("pretokenize", help="conversations (reference JSON) + images -> a TFDS ArrayRecord dataset")
    pre.add_argument("items", help="a .json list or .jsonl file of items in the reference's conversation format")
    pre.add_argument("--out", required=True, help="dataset directory (resumes if a run was stopped)")
    pre.add_argument("--tokenizer", help="Chameleon's text_tokenizer.json ('demo': the small demo tokenizer)")
    pre.add_argument("--vqgan", help="Meta's vqgan.ckpt, a VQ-GAN directory this package wrote, or an HF Chameleon / "
                                     "UniToken dir, as given or converted ('demo': the demo VQ-GAN)")
    pre.add_argument("--image-root", default=None, help="where relative image paths start (default: the items' dir)")
    # (TFDS finds the shards by their file names, NAME-SPLIT.array_record-...)
    pre.add_argument("--name", default="unitoken", help="the dataset's name: letters, digits and '_'")
    pre.add_argument("--split", default="train", help="the split's name: letters, digits, '_' and '-'")
    pre.add_argument("--anyres", action="store_true", help="lay out SigLIP features the AnyRes way")
    pre.add_argument("--vq-size", type=_whole(1), default=None,
                     help="side of the VQ crop (512; with the demo tokenizers 32)")
    pre.add_argument("--siglip-size", type=_whole(1), default=None,
                     help="side of a SigLIP tile (384; with the demo tokenizers 56)")
    pre.add_argument("--patch", type=_whole(1), default=14, help="SigLIP patch size")
    pre.add_argument("--max-length", type=_whole(0), default=None,
                     help="longer items are skipped and listed (0: no limit; default 4096, with --anyres 4096 plus "
                          "the largest picture's SigLIP block, 7796 for the release: the reference spends its 4096 "
                          "positions on the discrete tokens)")
    pre.add_argument("--chunk-size", type=_whole(1), default=512, help="items per resumable chunk")
    pre.add_argument("--vq-batch", type=_whole(1), default=32, help="images per VQ-GAN call")
    pre.add_argument("--process-index", type=_whole(0), default=0,
                     help="this process's share (chunk %% count == index)")
    pre.add_argument("--process-count", type=_whole(1), default=1, help=count_help)
    pre.set_defaults(func=_pretokenize)
    tra = sub.add_parser(
        "train", help="run a training stage (same flags as python -m unitoken_jax.train)",
        usage="unitoken train --config CONFIG[:VARIANT] --workdir DIR [--config.KEY=VALUE ...] [--distributed]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs one training stage. The flags are absl flags, as `python -m unitoken_jax.train` takes them:\n\n"
                    "  --config     a stage config: a file (configs/stage2.py), or a packaged one by name with a\n"
                    "               variant (stage1.py, stage2.py, stage3.py; ':tiny' for the small demo run,\n"
                    "               ':anyres' for the AnyRes 7B)\n"
                    "  --workdir    checkpoints, TensorBoard metrics, samples.jsonl and the final model\n"
                    "  --config.KEY=VALUE   any config field, e.g. --config.total_steps=100\n"
                    "               --config.data.sources=/data/meta.yaml --config.init_from.paths=/ckpt\n"
                    "  --distributed, --coordinator HOST:PORT, --num_processes N, --process_id I   multi-host runs\n\n"
                    "A stopped run resumes from its newest complete checkpoint when the same command runs again.")
    tra.add_argument("absl_flags", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    tra.set_defaults(func=_train)
    swe = add_parser("sweep", help="expand a config's sweep(add) into runs: print their launch commands, or run "
                                       "them here one after another; summarise a sweep's runs")
    swe.add_argument("config", nargs="?", help="FILE.py[:ARG] with get_config(arg) and sweep(add) (not needed with "
                                               "--summary-only)")
    swe.add_argument("--root", required=True, help="the sweep's directory: one workdir per run, ROOT/<name>")
    mode = swe.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true", help="print one train command per unfinished run "
                                                                    "(the default)")
    mode.add_argument("--run-locally", action="store_true", help="train the unfinished runs here, one process each, "
                                                                 "then print the summary")
    mode.add_argument("--summary-only", action="store_true", help="print the table of ROOT's runs")
    swe.add_argument("--launcher", default=None,
                     help="a template for each run's command line: {run} (its name) and {i} (its index) are filled "
                          "in, {args} takes the train arguments from --config on (for scripts that build the python "
                          "command, e.g. 'launch/tpu_train.sh --name slice-{i} --zone Z --project P {args}' or "
                          "'sbatch --job-name {run} launch/slurm_train.sbatch {args}'), {command} the whole train "
                          "command; a template with neither is a prefix to the whole command")
    swe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="an override for every run, as --config.KEY=VALUE is for one (repeatable)")
    swe.add_argument("--json", action="store_true", help="print JSON instead of a table or command lines")
    swe.set_defaults(func=_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    as_program = argv is None  # the `unitoken` command, not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        if set(argv[1:]) & {"-h", "--help", "--helpshort", "--helpfull"}:  # (anywhere: absl's help listed no flag)
            verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            verbs.choices["train"].print_help()
            return 0
        return _train(argparse.Namespace(absl_flags=argv[1:], as_program=as_program))  # absl parses the rest
    if argv[:1] == ["understand"]:  # options anywhere among its pictures and question (argparse's
        # intermixed parse, which a parser with subcommands cannot do, gave the second of two pictures
        # before an option to QUESTION)
        verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        args = verbs.choices["understand"].parse_intermixed_args(argv[1:])
        args.command = "understand"
    else:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the verb's parser: "unitoken generate: error: ...", with its usage line
            verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            verbs.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    _expand_home(args)
    # this package's INFO lines (what the bundled model knows, where the compilation cache is) and the
    # libraries' warnings. The level is set on our logger, not the root: importing orbax already logged
    # through absl, which gave the root a handler, so this basicConfig is often a no-op (and a root
    # level set here was, which hid those lines)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("unitoken_jax").setLevel(logging.INFO)
    if as_program:  # (the sweep sets its own while it runs; the server's lets a running batch finish)
        stop_on_signals(sigterm=args.command not in ("serve", "sweep"))
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing to say to it
        with contextlib.suppress(OSError, ValueError):  # (Python's own flush at exit would fail again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError) as e:  # bad input, or a file that cannot be read or written: one line
        print(f"unitoken {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ImportError) as e:  # Ctrl-C, a SIGTERM: a line, not a traceback
        if isinstance(e, ImportError):  # a stop inside an extension's initialisation (jaxlib's, as a verb
            if not STOPS:  # imports JAX) comes out as an unchained ImportError (`console.main`)
                raise
            e = STOPS[-1]()
        why, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        resumes = _RESUMES.get(args.command) if args.command != "generate" or args.prompts_file else None
        # (the sweep's own handler raises KeyboardInterrupt at any of its stop signals: it says the run's end)
        said = resumes if args.command == "sweep" else why + (f"; {resumes}" if resumes else "")
        print(f"\nunitoken {args.command}: stopped ({said})", file=sys.stderr)
        if as_program:
            exit_now(code)
        return code
    except Exception as e:  # XLA refusing a program or an allocation for the devices' memory
        jax = sys.modules.get("jax")  # imported by whatever raised it, if it is XLA's
        if jax is None or not isinstance(e, jax.errors.JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"unitoken {args.command}: error: out of device memory ({str(e).splitlines()[0][:300]}). "
              f"{_memory_advice(args)}", file=sys.stderr)
        return 1


# arguments that name files or directories: a `~` the shell left as written (`--model=~/m`, a quoted
# value) is the user's home, as it would be unquoted
_PATH_ARGS = ("adapters", "compilation_cache", "config", "dst", "image", "image_root", "model", "out", "out_dir",
              "prompts_file", "root", "src", "tokenizer", "vqgan")


def _expand_home(args: argparse.Namespace) -> None:
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
    if getattr(args, "inputs", None):  # pictures (and understand's question, left alone unless it is a path)
        args.inputs = [os.path.expanduser(v) if v.startswith("~") and os.path.exists(os.path.expanduser(v)) else v
                       for v in args.inputs]


_RESUMES = {"caption": "with a .jsonl --out, a rerun goes on where this one stopped",
            "generate": "with --prompts-file, a rerun draws only the prompts whose pictures are missing",
            "pretokenize": "a rerun into the same directory keeps the chunks it finished",
            "sweep": "its current run got a SIGTERM and saved; run the sweep again to resume it"}

def _memory_advice(args: argparse.Namespace) -> str:
    """What would fit on the devices, in the flags this command has (reconstruct's VQ-GAN has no
    int8, no batch and no mesh: its picture's size is what it can change)."""
    if not hasattr(args, "quantize"):
        return ("A smaller picture would fit (--size), or a machine with more memory"
                if hasattr(args, "size") else "A machine with more memory would fit it")
    at_once = [f for f, name in (("--n", "n"), ("--batch-size", "batch_size"), ("--max-batch", "max_batch"))
               if hasattr(args, name)]
    ways = ["--quantize int8 (the matmul weights in half the bytes of bfloat16)"]
    if at_once:
        ways.append(f"fewer pictures or questions at once ({', '.join(at_once)})")
    if hasattr(args, "mesh"):
        ways.append("the model split over more chips (--mesh)")
    return (f"Less would fit with {', '.join(ways[:-1]) + ', or ' + ways[-1] if len(ways) > 1 else ways[0]}; "
            "`python launch/aot_check.py decode --topology v5e:1x1 --images 4 --quantize int8` compiles a release "
            "for a chip and says what fits, without one")


if __name__ == "__main__":
    _code = main()
    # the work is done: a Ctrl-C in JAX's exit clean-up printed a traceback "ignored in atexit callback"
    # (as `console.main`, the `unitoken` command's entry, already did)
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(_code)
