"""The demo: its dataset (real package photos, self-blended fakes, disjoint identities per
split), one-line errors for bad overrides, and a copied workdir resuming on its own data."""

import json
import shutil

import numpy as np
import pytest

from cae_jax import demo, eval_pipeline
from cae_jax.config import load_config
from tests import datasets

# configs/tiny.py's model, as --config.model overrides of the demo's config.
TINY_MODEL = {"encoder.stem_features": (8, 16), "encoder.entry_features": (16, 24, 32),
              "encoder.exit_features": (32, 48), "encoder.head_features": (48, 64),
              "decoder.features": (32, 16, 16, 8, 8), "classifier.hidden": (16,)}


def test_demo_dataset_has_disjoint_identities_and_paired_videos(tmp_path):
    out = demo.build_dataset(tmp_path / "data", size=32, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    config = load_config(demo.DEMO_CONFIG)
    config.model.image_size = 32
    config.train.batch_size = 64
    identities = {}
    for split, ids in demo.SPLIT_IDENTITIES.items():
        fakes_per_real = demo.FAKES_PER_IDENTITY[split]
        real_frames = len(ids) * demo.FRAMES_PER_VIDEO[split]
        rows = [b for b in eval_pipeline.eval_batches(config, str(out), split)]
        keep = np.concatenate([b["mask"] for b in rows])
        labels = np.concatenate([b["label"] for b in rows])[keep]
        videos = np.concatenate([b["video_id"] for b in rows])[keep]
        methods = np.concatenate([b["method"] for b in rows])[keep]
        images = np.concatenate([b["image"] for b in rows])[keep]
        assert (labels == 0).sum() == real_frames, split
        if split == "train":  # Training fakes are blended on the fly.
            assert (labels == 0).all()
        assert (labels == 1).sum() == fakes_per_real * real_frames, split
        assert set(methods[labels == 0]) == {"real"}
        assert set(methods[labels == 1]) == ({"SBI"} if fakes_per_real else set())
        identity = [v.split("/")[2][:3] for v in videos]
        identities[split] = set(identity)
        assert len(identities[split]) == len(ids)
        # Every fake frame is a changed copy of the real frame of its identity and index, and
        # the fake videos of one identity carry different blends.
        frame_ids = np.concatenate([b["frame_index"] for b in rows])[keep]
        key = [f"{i}:{f}" for i, f in zip(identity, frame_ids, strict=True)]
        real = {k: images[i] for i, k in enumerate(key) if labels[i] == 0}
        fakes: dict[str, list] = {}
        for i, k in enumerate(key):
            if labels[i] == 1:
                assert (images[i] != real[k]).any(), k
                fakes.setdefault(k, []).append(images[i])
        assert sorted(fakes) == (sorted(real) if fakes_per_real else [])
        for k, copies in fakes.items():
            assert len(copies) == fakes_per_real, k
            assert all((a != b).any() for j, a in enumerate(copies) for b in copies[j + 1:]), k
        assert manifest["splits"][split]["frames"] == (1 + fakes_per_real) * real_frames
        assert manifest["splits"][split]["videos"] == (1 + fakes_per_real) * len(ids)
    assert not identities["train"] & identities["test"]
    assert not identities["train"] & identities["validation"]
    assert not identities["validation"] & identities["test"]


@pytest.mark.parametrize("item, message", [
    ("--config.train.step=3", "error: unknown config field --config.train.step; "
                              "did you mean train.steps?"),
    ("--config.train.steps=0", "error: invalid config: train.steps=0 (must be an integer >= 1)"),
])
def test_bad_demo_overrides_are_one_line_before_any_work(tmp_path, item, message):
    import subprocess
    import sys

    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "cae_jax.main", "demo", "--workdir",
                             str(workdir), item], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message
    assert not workdir.exists()


def test_a_copied_demo_workdir_resumes_on_its_own_data(tmp_path, capsys):
    """The demo's training step run in a workdir, then again in a copy of it with the
    original gone: the copy resumes on its own data/ (its config.json named the original's)."""
    from cae_jax import checkpoints

    def config(steps: int):
        return load_config(demo.DEMO_CONFIG, [
            *(f"--config.model.{field}={value}" for field, value in TINY_MODEL.items()),
            f"--config.train.steps={steps}", "--config.train.batch_size=8",
            "--config.train.eval_every=2", "--config.train.checkpoint_every=2"])

    first, copy = tmp_path / "first", tmp_path / "copy"
    datasets.write(first / "data", {"train": (8, 8), "validation": (4, 4)}, num_shards=1)
    demo.train_on(first, config(2), first / "data")
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    capsys.readouterr()

    demo.train_on(copy, config(4), copy / "data")
    out = capsys.readouterr().out
    assert (f"demo: {copy / 'train'} was trained on {first / 'data'}; its workdir moved, so it "
            f"continues on {copy / 'data'}") in out
    assert f"resumed from {copy / 'train' / 'checkpoints'} at step 2" in out
    assert sorted(p.name for p in (copy / "train" / "checkpoints").iterdir()) == ["2", "4"]
    assert checkpoints.read_config(copy / "train").input.train_dirs == (str(copy / "data"),)
    assert not first.exists()
