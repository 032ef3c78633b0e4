"""The demo dataset: real package photos, self-blended fakes, disjoint identities per split."""

import json

import numpy as np

from cae_jax import demo, input_pipeline
from cae_jax.config import load_config


def test_demo_dataset_has_disjoint_identities_and_paired_videos(tmp_path):
    out = demo.build_dataset(tmp_path / "data", size=32, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    config = load_config(demo.DEMO_CONFIG)
    config.model.image_size = 32
    config.train.batch_size = 64
    identities = {}
    for split, ids in demo.SPLIT_IDENTITIES.items():
        frames = 2 * len(ids) * demo.FRAMES_PER_VIDEO[split]
        rows = [b for b in input_pipeline.eval_batches(config, str(out), split)]
        keep = np.concatenate([b["mask"] for b in rows])
        labels = np.concatenate([b["label"] for b in rows])[keep]
        videos = np.concatenate([b["video_id"] for b in rows])[keep]
        methods = np.concatenate([b["method"] for b in rows])[keep]
        images = np.concatenate([b["image"] for b in rows])[keep]
        assert len(labels) == frames, split
        assert labels.sum() == frames // 2
        assert set(methods[labels == 1]) == {"SBI"} and set(methods[labels == 0]) == {"real"}
        identities[split] = {v.split("/")[2] for v in videos}
        assert len(identities[split]) == len(ids)
        # Every fake frame is a changed copy of the real frame of the same video and index.
        frame_ids = np.concatenate([b["frame_index"] for b in rows])[keep]
        key = [f"{v.split('/')[2]}:{f}" for v, f in zip(videos, frame_ids, strict=True)]
        real = {k: images[i] for i, k in enumerate(key) if labels[i] == 0}
        assert sorted(real) == sorted(k for k, y in zip(key, labels, strict=True) if y == 1)
        for i, k in enumerate(key):
            if labels[i] == 1:
                assert (images[i] != real[k]).any(), k
        assert manifest["splits"][split]["frames"] == frames
        assert manifest["splits"][split]["videos"] == 2 * len(ids)
    assert not identities["train"] & identities["test"]
    assert not identities["train"] & identities["validation"]
    assert not identities["validation"] & identities["test"]
