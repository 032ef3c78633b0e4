"""`cae-jax demo --workdir DIR`: the whole pipeline on a CPU with no data supplied.

1. Builds a face dataset from real photos that ship inside PyPI packages (the 100 LFW faces of
   `skimage.data.lfw_subset()` and the astronaut photo): each identity gives a short real "video"
   (the photo zooming, rolling and drifting). Identities are split disjointly: train / validation /
   test. Training stores real videos only, as the SBI paper trains: the fakes are blended afresh
   on the fly (`input.sbi.prob`). Each held-out identity also gets several fake videos, each with
   its own blend held for the whole video (`sbi.self_blend`). Written with `prepare`'s writer to
   DIR/data.
2. Trains configs/demo.py on it (DIR/train), selecting the checkpoint on validation.
3. Evaluates the selected checkpoint on the held-out test identities (DIR/eval).
4. Exports it (DIR/bundle) and predicts a few test frames saved as PNG (DIR/predict.json).
5. Prints a summary and writes DIR/demo_summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from ml_collections import ConfigDict

from cae_jax import config as config_lib

ACCEPTS_CONFIG_OVERRIDES = True
DATASET_NAME = "demo_faces"
DEMO_CONFIG = config_lib.shipped_config("demo")
# Identities (LFW faces 0..99, astronaut = 100) per split; test identities are never trained on.
SPLIT_IDENTITIES = {"train": [*range(70), 100], "validation": range(70, 85), "test": range(85, 100)}
FRAMES_PER_VIDEO = {"train": 16, "validation": 4, "test": 4}
# Stored fake videos per identity, each with its own blend (as FF++ has one per method). Held-out
# splits get three so that their AUC rests on 45 blends, not 15; training gets none.
FAKES_PER_IDENTITY = {"train": 0, "validation": 3, "test": 3}


def identity_photos(size: int) -> list[np.ndarray]:
    """Real face photos from scikit-image's package data, as uint8 RGB squares of `size`."""
    from skimage import data

    lfw = data.lfw_subset()[:100]  # The first 100 of the 200 are faces.
    photos = [
        cv2.resize(np.repeat((face * 255).astype(np.uint8)[..., None], 3, -1), (size, size),
                   interpolation=cv2.INTER_CUBIC)
        for face in lfw
    ]
    astronaut = data.astronaut()[20:220, 140:340]
    photos.append(cv2.resize(astronaut, (size, size), interpolation=cv2.INTER_AREA))
    return photos


def video_frames(photo: np.ndarray, count: int, size: int, rng: np.random.Generator) -> list:
    """A short clip of `photo`: a slow zoom, roll and drift (head motion), cropped to `size`.

    The motion gives 100 photos more variety to learn from: with a narrower zoom and no
    roll, seed 0's test AUC was 0.82 instead of 0.92 (docs/training.md).
    """
    h, w = photo.shape[:2]
    zoom_end = rng.uniform(1.0, 1.25)
    roll_end = rng.uniform(-10, 10)
    shift_end = rng.uniform(-0.06, 0.06, size=2) * (w, h)
    frames = []
    for t in np.linspace(0.0, 1.0, count):
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), roll_end * t, 1.0 + (zoom_end - 1.0) * t)
        matrix[:, 2] += shift_end * t
        moved = cv2.warpAffine(photo, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)
        frames.append(cv2.resize(moved, (size, size), interpolation=cv2.INTER_AREA))
    return frames


def split_examples(split: str, photos: list[np.ndarray], size: int, seed: int) -> Iterator[dict]:
    """The split's real videos and their self-blended fakes, in the record schema."""
    from cae_jax import sbi

    for identity in SPLIT_IDENTITIES[split]:
        rng = np.random.default_rng([seed, identity])
        frames = video_frames(photos[identity], FRAMES_PER_VIDEO[split], size, rng)
        videos = [("real", 0, None)] + [
            ("SBI", 1, int(rng.integers(2**31))) for _ in range(FAKES_PER_IDENTITY[split])
        ]
        for k, (method, label, blend_seed) in enumerate(videos):
            name = f"{identity:03d}_{k}.mp4" if label else f"{identity:03d}.mp4"
            for index, frame in enumerate(frames):
                # One blend per video (same seed each frame), like a swap that holds its mask.
                image = frame if not label else \
                    sbi.self_blend(frame, np.random.default_rng(blend_seed))[0]
                yield {
                    "image": image, "label": label, "dataset": DATASET_NAME, "method": method,
                    "compression": "raw", "video_id": f"{split}/{method}/{name}",
                    "frame_index": index, "face_box": np.array([0, 0, size, size], np.float32),
                    "fps": 25.0,
                }


def build_dataset(out_dir: Path, size: int, seed: int) -> Path:
    """Writes the demo dataset with `prepare`'s writer (kept when it already exists)."""
    from data_prep import writer

    if (out_dir / "dataset_info.json").is_file():
        return out_dir
    photos = identity_photos(int(size * 1.25))
    splits = {split: split_examples(split, photos, size, seed) for split in SPLIT_IDENTITIES}
    return Path(writer.write_dataset(out_dir, DATASET_NAME, splits, num_shards=2,
                                     description="cae-jax demo: package face photos + SBI"))


def ensure_bundle(workdir: Path, step: int) -> Path:
    """`workdir/bundle`, exported from `workdir/train`'s selected checkpoint `step`.

    A bundle from an earlier demo run in this workdir is kept if it holds `step` and replaced
    if not: a run resumed with more steps may select another checkpoint.
    """
    from cae_jax import main, serving

    bundle = workdir / "bundle"
    if bundle.exists() and json.loads((bundle / serving.MODEL_JSON).read_text())["step"] != step:
        print(f"demo: {bundle} holds another step than the selected {step}; exporting anew")
        shutil.rmtree(bundle)
    if not bundle.exists():
        main.main(["export", "--workdir", str(workdir / "train"), "--out", str(bundle),
                   "--formats", "jax_export"])
    return bundle


def export_and_predict(workdir: Path, data_dir: Path, step: int) -> dict:
    """Exports the selected checkpoint (`step`), calibrated on the validation split, and
    scores a real and a fake test frame as PNG files at the bundle's threshold; the test
    split's balanced accuracy at that threshold goes beside them."""
    from cae_jax import eval_pipeline, export, main, metrics, serving

    bundle = ensure_bundle(workdir, step)
    samples = workdir / "predict_inputs"
    samples.mkdir(exist_ok=True)
    config = config_lib.load_config(DEMO_CONFIG)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    config.input.eval_batch_size = manifest["splits"]["test"]["frames"]
    batch = next(eval_pipeline.eval_batches(config, str(data_dir), "test"))  # The whole split.
    first_fake = int(np.argmax(batch["label"]))
    for name, row in (("real", 0), ("fake", first_fake)):
        cv2.imwrite(str(samples / f"{name}.png"), cv2.cvtColor(batch["image"][row],
                                                                cv2.COLOR_RGB2BGR))
    out = workdir / "predict.json"
    main.main(["predict", str(samples), "--model", str(bundle), "--out", str(out),
               "--no-detect"])  # The saved frames are face crops already.
    predictor = serving.load_bundle(bundle)
    threshold, decision = serving.decision_threshold(predictor.meta)
    labels, probs, _ = export.score_prepared(predictor, config, str(data_dir), "test")
    return {"predictions": json.loads(out.read_text()), "threshold": threshold,
            "decision": decision,
            "test_balanced_acc": metrics.rates_at(labels, probs, threshold)["balanced_acc"]}


def adopt_data_dir(train_dir: Path, data_dir: Path) -> None:
    """Points a moved or copied demo workdir's train/config.json at its own data/.

    The saved config names the data dir the run started with, and a resume refuses other
    data dirs; a demo trains only on the data/ beside it, so the path is recomputed here.
    """
    from cae_jax import checkpoints

    if not (train_dir / checkpoints.CONFIG_FILE).is_file():
        return
    saved = checkpoints.read_config(train_dir)
    if tuple(saved.input.train_dirs) != (str(data_dir),):
        print(f"demo: {train_dir} was trained on {', '.join(saved.input.train_dirs)}; "
              f"its workdir moved, so it continues on {data_dir}")
        saved.input.train_dirs = (str(data_dir),)
        checkpoints.write_config(train_dir, saved)


def train_on(workdir: Path, config: ConfigDict, data_dir: Path) -> None:
    """Step 2: trains `workdir/train` on `data_dir` alone, resuming an earlier demo run of
    this workdir, also one run where the workdir was before a copy or a move."""
    from cae_jax import train

    config.input.train_dirs = (str(data_dir),)
    adopt_data_dir(workdir / "train", data_dir)
    train.train(config, workdir / "train")


def run_demo(workdir: Path, overrides: list[str]) -> dict:
    from cae_jax import evaluate

    start = time.time()
    config = config_lib.load_config(DEMO_CONFIG, overrides)
    data_dir = build_dataset(workdir / "data", config.model.image_size, config.seed)
    built = time.time()
    train_on(workdir, config, data_dir)
    trained = time.time()
    report = evaluate.evaluate_checkpoint(workdir / "train", [str(data_dir)], "test",
                                          workdir / "eval" / "metrics.json")
    test = report["results"][data_dir.name]["all"]
    decided = export_and_predict(workdir, data_dir, report["step"])
    summary = {
        "test_frame_auc": test["frame"]["auc"],
        "test_frame_balanced_acc_at_threshold": decided["test_balanced_acc"],
        "threshold": decided["threshold"],
        "decision": decided["decision"],
        "test_frame_acc": test["frame"]["acc"],
        "test_frame_eer": test["frame"]["eer"],
        "test_video_auc": test["video"]["auc"],
        "test_video_acc": test["video"]["acc"],
        "train_steps": config.train.steps,
        "selected_step": report["step"],
        "seconds": round(time.time() - start, 1),
        "seconds_data": round(built - start, 1),
        "seconds_train": round(trained - built, 1),
        "predictions": decided["predictions"],
        "workdir": str(workdir),
    }
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True,
                        help="output dir: data/, train/, eval/, bundle/, demo_summary.json")
    parser.epilog = "configs/demo.py fields are overridden with --config.a.b=value."


def run(args: argparse.Namespace) -> int:
    from cae_jax import dir_lock, train

    workdir = Path(args.workdir)
    try:
        config_lib.load_config(DEMO_CONFIG, args.overrides)  # Bad overrides: before any work.
        dir_lock.make_directory(workdir, "--workdir")
        summary = run_demo(workdir, args.overrides)
    except (FileNotFoundError, ValueError, train.NonFiniteLossError,
            dir_lock.DirectoryError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"demo: test frame AUC {summary['test_frame_auc']:.4f}, balanced accuracy "
          f"{summary['test_frame_balanced_acc_at_threshold']:.4f} at {summary['threshold']:.4f} "
          f"({summary['decision']}), video AUC "
          f"{summary['test_video_auc']:.4f}, {summary['train_steps']} steps, "
          f"{summary['seconds']:.0f} s; summary in {workdir / 'demo_summary.json'}")
    return 0
