"""`cae-jax import-weights` on bad input: a file of another format, an existing --output and
arrays of the wrong shapes are each one line naming the file, and nothing is written."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from cae_jax import config as config_lib
from cae_jax.backbones import xception


def import_cli(tmp_path, fmt: str, source, output=None) -> subprocess.CompletedProcess:
    output = output or tmp_path / "imported"
    return subprocess.run(
        [sys.executable, "-m", "cae_jax.main", "import-weights", "--format", fmt, "--input",
         str(source), "--output", str(output), "--config", "configs/tiny.py"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_file_of_another_format_is_named_in_one_line(tmp_path):
    pth = tmp_path / "xception.pth"
    pth.write_bytes(b"PK\x03\x04" + bytes(200))  # A torch zip, given as timm safetensors.
    assert one_line_error(import_cli(tmp_path, "timm", pth)).startswith(
        f"error: {pth}: not a safetensors file (")
    png = tmp_path / "face.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    assert one_line_error(import_cli(tmp_path, "keras", png)).startswith(
        f"error: {png}: not a Keras HDF5 weights file (")
    assert not (tmp_path / "imported").exists()


def test_an_existing_output_is_refused_before_anything_is_read(tmp_path):
    output = tmp_path / "imported"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    source = tmp_path / "weights.safetensors"
    source.write_bytes(b"not read")
    assert one_line_error(import_cli(tmp_path, "timm", source, output)) == \
        f"error: --output {output} exists; choose a new directory"
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_timm_arrays_of_wrong_shapes_are_refused_naming_the_first(tmp_path):
    from safetensors.numpy import save_file

    config = config_lib.load_config("configs/tiny.py")
    arrays = {}
    for layer in xception.encoder_layout(config.model):  # Every name right, every shape not.
        names = {"conv": ("weight",), "sep": ("conv1.weight", "pointwise.weight"),
                 "bn": ("weight", "bias", "running_mean", "running_var")}[layer.kind]
        for name in names:
            arrays[f"{layer.timm}.{name}"] = np.ones((1, 1, 1, 1) if "weight" in name
                                                     and layer.kind != "bn" else (1,), np.float32)
    source = tmp_path / "legacy_xception.safetensors"
    save_file(arrays, str(source))
    assert one_line_error(import_cli(tmp_path, "timm", source)) == (
        f"error: {source}: array conv1.kernel has shape (1, 1, 1, 1), the encoder's is "
        "(3, 3, 3, 8) (model.encoder widths of --config)")
    assert not (tmp_path / "imported").exists()
