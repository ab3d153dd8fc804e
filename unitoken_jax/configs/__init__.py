"""The configs that ship with the package, and how a config named on a command line is found.

`model.py` holds the model presets (7b, 7b_anyres, tiny); `stages.py` what the three training
stages share; `stage1.py` .. `stage3.py` the stage configs with their sweeps; `finetune.py` LoRA /
full fine-tuning of the release on one host. Each is an
ml_collections `get_config(arg)` file. The repository's top-level `configs/` holds files of the
same names that users copy and edit; they import these.

A config spec is `FILE.py[:ARG]` as ml_collections' config flag takes it. An existing file is
used as it is; otherwise a bare name (`stage2`, `stage2.py`) or `configs/NAME.py` resolves to the
packaged config of that name, so the README's commands work from any directory once the package
is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Sequence

PACKAGED = ("model", "stages", "stage1", "stage2", "stage3", "finetune")
TRAINING = ("stage1", "stage2", "stage3", "finetune")  # the packaged configs a training run takes
_HERE = os.path.dirname(os.path.abspath(__file__))


def packaged_path(name: str) -> str:
    if name not in PACKAGED:
        raise FileNotFoundError(f"no packaged config {name!r}; the package has {', '.join(PACKAGED)}")
    return os.path.join(_HERE, f"{name}.py")


def resolve_spec(spec: str) -> str:
    """`FILE[:ARG]` -> the same with FILE a file that exists (see the module docstring)."""
    file, colon, arg = spec.partition(":")
    if os.path.isfile(file):
        return spec
    head, base = os.path.split(file)
    name = base[:-3] if base.endswith(".py") else base
    if head.rstrip("/") in ("", "configs") and name in PACKAGED:
        return packaged_path(name) + colon + arg
    raise FileNotFoundError(f"no config file {file!r} (from {spec!r}); give the path of a get_config file or one "
                            f"of the packaged configs by name ({', '.join(PACKAGED)}, e.g. stage2.py:tiny)")


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
    """A command line with the value of `--config` (either `--config X` or `--config=X`) resolved."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve_spec(out[i + 1])
        elif a.startswith(f"--{flag}="):
            out[i] = f"--{flag}=" + resolve_spec(a.split("=", 1)[1])
    return out


# config fields that hold a tuple of paths: `--config.data.sources=/a,/b` (the README's form) was
# ml_collections' "Error while parsing string ... as tuple"; it takes `"'/a','/b'"` only
PATH_LISTS = ("data.sources", "eval.sources")


def quote_path_lists(argv: Sequence[str], flag: str = "config") -> list[str]:
    """A command line with each `--config.<PATH_LISTS>=a,b` written as the tuple literal
    ml_collections parses (a value already quoted, bracketed or without a comma is left)."""
    out = list(argv)

    def quoted(value: str) -> str:
        if "," not in value or value.lstrip()[:1] in ("(", "[", "'", '"'):
            return value
        return repr(tuple(part.strip() for part in value.split(",") if part.strip()))

    for i, a in enumerate(out):
        for field in PATH_LISTS:
            name = f"--{flag}.{field}"
            if a.startswith(name + "="):
                out[i] = name + "=" + quoted(a.split("=", 1)[1])
            elif a == name and i + 1 < len(out):
                out[i + 1] = quoted(out[i + 1])
    return out


def load_module(spec: str):
    """`FILE[:ARG]` -> (the config module, ARG or None); a packaged config is imported, a file loaded
    by path as ml_collections' config flag does."""
    resolved = resolve_spec(spec)
    file, colon, arg = resolved.partition(":")
    if os.path.dirname(os.path.abspath(file)) == _HERE:
        module = importlib.import_module(f"{__name__}.{os.path.basename(file)[:-3]}")
    else:
        name = f"unitoken_config_{abs(hash(os.path.abspath(file)))}"
        module_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    return module, (arg if colon else None)


def get_config(spec: str):
    """The ConfigDict of `FILE[:ARG]` (what `--config FILE[:ARG]` gives, before `--config.x=y` overrides)."""
    module, arg = load_module(spec)
    return module.get_config(arg) if arg is not None else module.get_config()


# fields a config file sets from its argument and records in config.json; nothing is built from them
# afterwards, so an override on the command line would relabel a run, not change it
LABELS = {
    "stage": "a stage's recipe (what trains, its learning rate, its data mix) is built by that stage's config: "
             "pass its file instead (stage1.py, stage2.py, stage3.py)",
    "model_name": "the model is built from the config's argument (stage2.py:tiny, stage2.py:anyres; none: the 7B) "
                  "or set field by field (--config.model.decoder.num_layers=...)",
}


def flat_dict(tree: dict, prefix: str = "") -> dict:
    """A nested dict (a config's `to_dict()`) as {dotted key: value}, the keys `--config.K=V` takes."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_no_label_overrides(keys) -> None:
    """A ValueError for an override (dotted key) of a field that only labels the run (`LABELS`)."""
    for key in keys:
        if key in LABELS:
            raise ValueError(f"--config.{key} would only relabel the run: {LABELS[key]}")


def unknown_field(error: BaseException) -> tuple[str, str] | None:
    """(field, did-you-mean hint or '') when `error` is ml_collections' refusal of a field a
    ConfigDict lacks (an AttributeError around a KeyError whose text is "'key'\\nDid you mean
    ..."); None for any other error."""
    while isinstance(error, (AttributeError, KeyError)) and error.args and \
            isinstance(error.args[0], (AttributeError, KeyError)):
        error = error.args[0]
    if not isinstance(error, (AttributeError, KeyError)) or not error.args or not isinstance(error.args[0], str):
        return None
    key, _, hint = error.args[0].partition("\n")
    key = key.strip("'\"")
    return (key, hint[:1].lower() + hint[1:]) if key else None
