"""notebooks/colab_tpu_inference.ipynb runs end to end on the CPU with the bundled model, sharded
over 4 fake devices (as over a TPU's cores), and shows its pictures and answers inline."""

import base64
import io
import os

import pytest
from PIL import Image

from conftest import COLLECTIVE_THREADS, PATIENT_COLLECTIVES
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
               XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {PATIENT_COLLECTIVES}")
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
