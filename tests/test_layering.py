"""The package's imports flow one way (README, "How the code is laid out"), read from the source
with `ast`, imports inside functions included:

    sharding, tokenizer/layout  <-  models, tokenizer  <-  convert  <-  model, vq_tokenizer
        <-  data, inference  <-  train  <-  world, sweep, cli

and one module owns the image-token layout: no other module spells its ids."""

import ast
import os
import sys
import tokenize

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unitoken_jax")

# what each part of the package may not import (parts are top-level modules or subpackages)
FORBIDDEN = {
    "sharding": {"models", "tokenizer", "convert", "model", "vq_tokenizer", "data", "inference", "train", "world",
                 "sweep", "cli", "configs"},
    "models": {"train", "inference", "convert", "data", "world", "cli", "model", "vq_tokenizer", "sweep", "configs"},
    "tokenizer": {"models", "train", "inference", "convert", "data", "world", "cli", "model", "vq_tokenizer", "sweep",
                  "configs"},
    "convert": {"train", "inference", "data", "world", "cli", "model", "vq_tokenizer", "sweep", "configs"},
    "model": {"train", "inference", "data", "world", "cli", "sweep", "configs"},
    "vq_tokenizer": {"train", "inference", "data", "world", "cli", "model", "sweep", "configs"},
    "inference": {"train", "data", "world", "cli", "sweep", "configs"},
    "data": {"train", "inference", "world", "cli", "sweep", "configs"},
    "configs": {"models", "tokenizer", "convert", "model", "vq_tokenizer", "data", "inference", "train", "world",
                "sweep", "cli"},
    "train": {"world", "cli", "sweep"},
    "sweep": {"train", "world", "cli", "model", "inference", "data"},
    "world": {"cli"},
    "serve": {"train", "world", "cli", "sweep", "convert", "data"},
}


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PACKAGE)
                yield rel, path


def _part(rel: str) -> str:
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".py") else first


def _imported_parts(path: str, rel: str):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in this package
                yield node.lineno, "<relative import>"
                continue
            names = [node.module or ""]
            if node.module == "unitoken_jax":  # from unitoken_jax import sharding, configs
                names = [f"unitoken_jax.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "unitoken_jax" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_imports_flow_one_way():
    wrong = []
    for rel, path in _modules():
        banned = FORBIDDEN.get(_part(rel), set())
        for line, target in _imported_parts(path, rel):
            if target == "<relative import>" or target in banned:
                wrong.append(f"unitoken_jax/{rel}:{line} imports unitoken_jax.{target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layering_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a models/ file importing train/ is caught."""
    bad = tmp_path / "unitoken_jax" / "models"
    bad.mkdir(parents=True)
    (bad / "bad.py").write_text("def f():\n    from unitoken_jax.train.loop import train_and_evaluate\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(tmp_path / "unitoken_jax"))
    with pytest.raises(AssertionError, match="models/bad.py:2 imports unitoken_jax.train"):
        test_imports_flow_one_way()


# the layout's ids, as the reference hard-codes them (DESIGN.md section 1)
_LAYOUT_IDS = {"8196", "8197", "8198", "8803", "8804", "8710", "16853"}  # (16853: the reference's image prefix)


def test_only_the_layout_module_spells_the_image_token_ids():
    """Numbers in code (not in strings or comments) that are layout ids."""
    found = []
    for rel, path in _modules():
        if rel == os.path.join("tokenizer", "layout.py"):
            continue
        with open(path, "rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type == tokenize.NUMBER and tok.string in _LAYOUT_IDS:
                    found.append(f"unitoken_jax/{rel}:{tok.start[0]}: {tok.line.strip()}")
    assert not found, "layout ids outside tokenizer/layout.py:\n" + "\n".join(found)


def test_importing_the_package_loads_no_jax():
    """The `unitoken` command sets up its Ctrl-C handling before JAX loads (a Ctrl-C during JAX's
    import was lost in its garbage-collector callback): that needs a package whose import is light,
    its names loaded when first used."""
    import subprocess

    code = ("import sys, unitoken_jax, unitoken_jax.console, unitoken_jax.shutdown, unitoken_jax.cli; "
            "assert 'jax' not in sys.modules, 'jax imported'; "
            "assert unitoken_jax.load.__module__ == 'unitoken_jax.model' and 'jax' in sys.modules")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert ran.returncode == 0, ran.stderr[-2000:]
    # nor do the command's help pages, its version and its usage errors (1.6 s of JAX and Orbax each)
    code = ("import sys; from unitoken_jax import cli\n"
            "for argv in (['--version'], ['generate', '--help'], ['convert', '--help'], ['generate', '--n', 'x']):\n"
            "    try: cli.main(argv)\n"
            "    except SystemExit: pass\n"
            "assert 'jax' not in sys.modules and 'orbax.checkpoint' not in sys.modules, 'jax imported'")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert ran.returncode == 0 and "usage: unitoken generate" in ran.stdout, ran.stderr[-2000:]


def test_a_ctrl_c_inside_an_extensions_initialisation_comes_again_after_it(monkeypatch):
    """A Ctrl-C that lands while a compiled extension initialises (jaxlib's, ml_dtypes' importing
    NumPy) is printed there as a traceback by NumPy's C API, and the import fails as an ImportError
    (a clean-clone CI met it: a traceback before "stopped (Ctrl-C)"). The handler now sends the
    signal again a moment later, once outside it; elsewhere it stops at once."""
    from unitoken_jax import shutdown

    from importlib import machinery

    # frames as importlib's extension loader makes them (its C init calls back into Python): its
    # methods, with the extension's initialisation in place of the C code, and a Python module's loader's
    scope = {"ExtensionFileLoader": machinery.ExtensionFileLoader, "SourceFileLoader": machinery.SourceFileLoader}
    exec(compile("class Extension(ExtensionFileLoader):\n    def create_module(self, spec):\n        return spec()\n"
                 "    def exec_module(self, module):\n        return module()\n"
                 "class Source(SourceFileLoader):\n    def exec_module(self, module):\n        return module()\n",
                 "<frozen importlib._bootstrap_external>", "exec"), scope)
    resent = []
    monkeypatch.setattr("threading.Timer", lambda delay, kill, args: type(
        "T", (), {"start": lambda self: resent.append((kill, args[1]))})())
    monkeypatch.setattr(shutdown, "STOPS", [])
    handler = shutdown._stop(KeyboardInterrupt)
    def inside():
        try:
            handler(2, sys._getframe())
        except KeyboardInterrupt:
            return "stopped inside the extension's initialisation"
        return "not stopped there"

    extension = scope["Extension"]("example", "example.so")
    assert extension.create_module(inside) == "not stopped there" and resent == [(os.kill, 2)]  # sent again
    assert extension.exec_module(inside) == "not stopped there" and len(resent) == 2  # (multi-phase init)
    # a Python module's import is not held up (a lazy import inside a long job)
    source = scope["Source"]("example", "example.py")
    assert source.exec_module(inside) == "stopped inside the extension's initialisation"
    # the same in a garbage collector's callback (JAX's runs at every collection), where Python prints
    # an exception as ignored and goes on: a Ctrl-C in a command's first seconds had been lost
    import gc

    said = []

    def callback(phase, info):
        if phase == "start" and not said:
            said.append(inside())

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert said == ["not stopped there"] and resent == [(os.kill, 2)] * 3
    with pytest.raises(KeyboardInterrupt):
        handler(2, sys._getframe())


def test_a_ctrl_c_inside_an_extensions_initialisation_is_said_as_a_stop(monkeypatch, capsys):
    """A Ctrl-C that landed while jaxlib's extension initialised came out as an ImportError with no
    KeyboardInterrupt chained ("Encountered an error while initializing the extension"): exit 1
    and a traceback, where the command says it stopped (130). Another ImportError stays one."""
    from unitoken_jax import cli, console, shutdown

    monkeypatch.setattr(console, "stop_on_signals", lambda **_: None)
    monkeypatch.setattr(console, "exit_now", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setitem(sys.modules, "unitoken_jax.cli", None)  # (its import raises ImportError)
    monkeypatch.delattr("unitoken_jax.cli", raising=False)
    with pytest.raises(ImportError):
        console.main()
    monkeypatch.setattr(shutdown, "STOPS", [KeyboardInterrupt])
    monkeypatch.setattr(console, "STOPS", shutdown.STOPS)
    with pytest.raises(SystemExit) as stop:
        console.main()
    assert stop.value.code == 130 and "unitoken: stopped (Ctrl-C) while starting" in capsys.readouterr().err
    # the same inside a verb, which imports JAX itself (the command's import of its verbs loads none)
    def importing_jax(args):
        raise ImportError("Encountered an error while initializing the extension.")

    monkeypatch.setattr(cli, "_init", importing_jax)
    monkeypatch.setattr(cli, "STOPS", [])  # no stop came: the ImportError is one
    with pytest.raises(ImportError):
        cli.main(["init", "--to", "/nonexistent/x"])
    monkeypatch.setattr(cli, "STOPS", [shutdown.Terminated])
    assert cli.main(["init", "--to", "/nonexistent/x"]) == 143
    assert "unitoken init: stopped (SIGTERM)" in capsys.readouterr().err

