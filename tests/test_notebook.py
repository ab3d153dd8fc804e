"""notebooks/colab_tpu_inference.ipynb runs end to end on the CPU with the bundled model, sharded
over 4 fake devices (as over a TPU's cores), and shows its pictures and answers inline; its model
cell plans a release checkpoint's memory as the chip it finds needs."""

import base64
import io
import os

import pytest
from PIL import Image

from conftest import CHEAP_COMPILES, COLLECTIVE_THREADS, PATIENT_COLLECTIVES, Chip
from unitoken_jax.world import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu_inference.ipynb")
nbclient = pytest.importorskip("nbclient", reason="the notebook runner (pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat", reason="the notebook runner (pip install -e '.[test]')")


@pytest.mark.slow
def test_the_colab_notebook_runs_and_shows_its_pictures(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PJRT_NPROC=COLLECTIVE_THREADS,
               XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {PATIENT_COLLECTIVES} {CHEAP_COMPILES}")
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails

    text, pictures, widgets = [], [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            if "image/png" in data:
                pictures.append(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))))
            if "text/plain" in data:
                text.append(data["text/plain"])
            if "application/vnd.jupyter.widget-view+json" in data:
                widgets += 1
    printed = "\n".join(text)
    # the model really is split: the bundled model's 4 heads and its SigLIP's 2 allow a tensor axis of 2
    assert "4 CPU device(s)" in printed and "mesh: {'data': 1, 'fsdp': 2, 'tensor': 2}" in printed
    assert "no device memory limit to plan with" in printed and "weights: float32" in printed  # the weight plan
    # the understanding cell answers every question with a word of the right kind
    answers = dict(line.rsplit(None, 1) for line in printed.splitlines()
                   if line.startswith(("What colour", "What shape", "Where is")) and len(line.split()) >= 4)
    assert answers["What colour is the shape?"] in shapes.COLOURS
    assert answers["What shape is this?"] in shapes.SHAPES
    assert any(line.startswith("next turn:") for line in printed.splitlines())  # the chat's second turn ran
    # pictures shown: the question's picture, 4 generated rows of 3, the edit pair, (a chat picture)
    assert len(pictures) >= 6
    grids = [p for p in pictures if p.size == (3 * 128 + 2 * 4, 128)]
    assert len(grids) == 4
    assert widgets >= 2  # tqdm.auto's progress bars rendered as notebook widgets (generation, edit)
    assert "IProgress not found" not in printed


@pytest.mark.parametrize("chip, gib, stored, quantize", [("TPU v5 lite", 15.75, "none", "int8"),
                                                         ("TPU v6 lite", 31.25, "none", "none"),
                                                         ("TPU v6 lite", 31.25, "int8", "int8")])
def test_the_notebook_plans_a_release_checkpoint_in_bfloat16_and_takes_int8_where_it_does_not_fit(
        tmp_path, monkeypatch, chip, gib, stored, quantize):
    """The model cell with MODEL_DIR set, run up to where it loads, on one Colab chip: its 4 pictures
    at 512 px with bfloat16 weights (18.26 GiB for the 7B) do not fit a v5e, so the cell takes int8
    and says why; a v6e keeps bfloat16. A checkpoint stored in int8 (`unitoken convert --quantize
    int8`) loads as it is: the plan had taken bfloat16 for it, which `load` refuses for int8
    weights. (The end-to-end run above takes the bundled model's branch, on a CPU, where there is
    no limit to plan with.)"""
    import json

    import jax

    from unitoken_jax import configs
    from unitoken_jax.convert import orbax_io
    from unitoken_jax.models.config import UniTokenConfig

    release = tmp_path / "release"  # the 7B's config as our checkpoints keep it; no tensor is read
    release.mkdir()
    seven_b = UniTokenConfig.from_dict(configs.get_config("model.py:7b").model).replace(quantize=stored)
    (release / orbax_io.SIDECAR).write_text(json.dumps({"config": seven_b.to_dict(),
                                                        "param_layout": orbax_io.PARAM_LAYOUT}))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "choose_quantize" in c.source)
    plan = cell[:cell.index("if MODEL_DIR:\n")]  # everything before the weights load
    assert 'MODEL_DIR = ""' in plan
    monkeypatch.setattr(jax, "local_devices", lambda *args, **kwargs: [Chip(gib, chip)])
    namespace = {}
    exec(plan.replace('MODEL_DIR = ""', f"MODEL_DIR = {str(release)!r}"), namespace)
    assert namespace["mesh"] is None and namespace["IMAGES"] == 4
    assert namespace["QUANTIZE"] == quantize, namespace["why"]
    said = {"none": "bfloat16 would need 18.26 GiB" if quantize == "int8" else "bfloat16 weights: 4 image(s)",
            "int8": "the checkpoint holds int8 weights, loaded as they are: 4 image(s) need"}[stored]
    assert said in namespace["why"]


def _install_cell() -> str:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and "pip" in c.source)


@pytest.mark.parametrize("where", ["url", "folder"])
def test_the_install_cell_gives_pip_a_requirement_it_takes(tmp_path, monkeypatch, where):
    """The cell put a Drive folder after "unitoken-jax[tpu] @", where pip takes URLs only ("Invalid
    URL ... No scheme supplied"). Here pip itself reads what the cell asks for (a dry run, offline)."""
    import importlib.util
    import subprocess
    import sys

    package = tmp_path / "unitoken-jax"
    package.mkdir()
    (package / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                            '"setuptools.build_meta"\n[project]\nname = "unitoken-jax"\n'
                                            'version = "0.0"\n[project.optional-dependencies]\ntpu = []\n')
    repo = package.as_uri().replace("file://", "git+file://") if where == "url" else str(package)
    source = _install_cell()
    line = next(x for x in source.splitlines() if x.startswith("REPO = "))
    asked = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: asked.append(argv))
    exec(source.replace(line, f"REPO = {repo!r}"), {})
    (argv,) = asked
    requirement = argv[-1]
    if where == "url":
        assert requirement == f"unitoken-jax[tpu] @ {repo}"
        from packaging.requirements import Requirement

        assert Requirement(requirement).url == repo  # what pip's parser reads: a name, extras and a URL
        return
    monkeypatch.undo()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                        "--no-build-isolation", "-q", "--report", str(tmp_path / "report.json"), requirement],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert [i["metadata"]["name"] for i in report["install"]] == ["unitoken-jax"]


def test_the_install_cell_says_what_to_set_and_mounts_drive_for_a_folder_there(monkeypatch):
    """Its placeholder URL (YOUR-ORG) made pip fail on Colab with a git credentials prompt; a Drive
    folder given before Drive was mounted was not there."""
    import importlib.util
    import subprocess
    import sys
    import types

    source = _install_cell()
    line = next(x for x in source.splitlines() if x.startswith("REPO = "))
    asked, mounted = [], []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: asked.append(argv))
    with pytest.raises(ValueError, match="set REPO in this cell to where your copy of unitoken-jax is"):
        exec(source, {})
    assert not asked
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mounted.append)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    exec(source.replace(line, 'REPO = "/content/drive/MyDrive/unitoken-jax"'), {})
    assert mounted == ["/content/drive"] and asked[-1][-1] == "/content/drive/MyDrive/unitoken-jax[tpu]"


def _model_cell(**settings) -> str:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "choose_quantize" in c.source)
    for name, value in settings.items():
        line = next(x for x in cell.splitlines() if x.startswith(f"{name} = "))
        cell = cell.replace(line, f"{name} = {value!r}")
    return cell


def test_the_model_cell_checks_the_tokenizers_before_loading_a_release_and_mounts_drive_for_its_cache(
        tmp_path, monkeypatch):
    """A wrong or empty TOKENIZER or VQGAN was found after the model had loaded (minutes for the 7B),
    as "[Errno 2] ... ''" or a VQ-GAN yaml message with the path left out; a VQ-GAN directory, which
    the CLI takes, was refused. A cache folder on Drive, not mounted yet, was made on the local disk,
    where it stops Drive from mounting."""
    import sys
    import types

    import jax

    import unitoken_jax
    from unitoken_jax.world import default

    if not default.available():
        pytest.skip("the install has no bundled model")
    monkeypatch.setattr(jax, "local_devices", lambda *args, **kwargs: [Chip(31.25, "TPU v6 lite")])
    monkeypatch.setattr(unitoken_jax, "load", lambda *a, **k: pytest.fail("the model loaded first"))
    release = os.path.join(default.DEFAULT_DIR, "model")  # a config to plan with; no tensor is read
    tokenizer = os.path.join(default.DEFAULT_DIR, "tokenizer.json")
    for settings, said in (
            (dict(TOKENIZER=""), "TOKENIZER is empty: a released model needs Chameleon's tokenizer files"),
            (dict(TOKENIZER=str(tmp_path / "nope.json")), f"TOKENIZER = '{tmp_path}/nope.json': "),
            (dict(TOKENIZER=tokenizer, VQGAN=""), "VQGAN is empty"),
            (dict(TOKENIZER=tokenizer, VQGAN=str(tmp_path / "vqgan.ckpt")),
             f"VQGAN = '{tmp_path}/vqgan.ckpt': {tmp_path}/vqgan.ckpt: no such VQ-GAN file or directory")):
        with pytest.raises(ValueError) as refused:
            exec(_model_cell(MODEL_DIR=release, **settings), {})
        assert said in str(refused.value), str(refused.value)

    class Mounted(Exception):
        pass

    def mount(path):
        assert path == "/content/drive"
        raise Mounted  # (nothing is made here under /content)

    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    with pytest.raises(Mounted):
        exec(_model_cell(COMPILATION_CACHE="/content/drive/MyDrive/unitoken-xla"), {})


def test_a_users_picture_is_shown_with_its_shape_kept():
    """A non-square picture of the user's was shown squashed to 192 x 192."""
    import ast

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "def shown(" in c.source)
    tree = ast.parse(cell)
    namespace = {"Image": Image}
    exec(compile(ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef)], []), "cell", "exec"), namespace)
    shown = namespace["shown"]
    assert shown(Image.new("RGB", (300, 100)), 192).size == (192, 64)
    assert shown(Image.new("RGB", (64, 64)), 192).size == (192, 192)
    assert shown(Image.new("RGB", (1000, 1)), 128).size == (128, 1)
