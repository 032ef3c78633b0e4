"""`import-weights --format deepfakebench`: DeepfakeBench's Xception detector checkpoint (their
state dict layout) scores 256x256 faces in cae-jax with the probabilities it gives in torch."""

import json
import sys

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from cae_jax import main, models, sharding, train_step, weights
from data_prep import writer
from tests.torch_helpers import randomize_batch_norm

SIDE = 256  # DeepfakeBench's resolution.


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError.
    path = tmp_path / "xception_best.pth"
    path.write_bytes(b"not read")
    with pytest.raises(SystemExit, match="xception_best.pth: reading a PyTorch checkpoint needs"):
        weights.read_torch_state_dict(path)


def deepfakebench_detector(torch):
    """Their `XceptionDetector` in plain torch.nn, module for module as DeepfakeBench's
    training/networks/xception.py ("original" mode) and detectors/xception_detector.py, so
    the state dict has their key names; an independent reference (not timm's port)."""
    nn = torch.nn

    class SeparableConv2d(nn.Module):
        def __init__(self, cin, cout, k=1, stride=1, padding=0):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cin, k, stride, padding, 1, groups=cin, bias=False)
            self.pointwise = nn.Conv2d(cin, cout, 1, 1, 0, 1, 1, bias=False)

        def forward(self, x):
            return self.pointwise(self.conv1(x))

    class Block(nn.Module):
        def __init__(self, cin, cout, reps, strides=1, start_with_relu=True, grow_first=True):
            super().__init__()
            self.skip = None
            if cout != cin or strides != 1:
                self.skip = nn.Conv2d(cin, cout, 1, stride=strides, bias=False)
                self.skipbn = nn.BatchNorm2d(cout)
            rep, filters = [], cin
            if grow_first:
                rep += [nn.ReLU(), SeparableConv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout)]
                filters = cout
            for _ in range(reps - 1):
                rep += [nn.ReLU(), SeparableConv2d(filters, filters, 3, 1, 1),
                        nn.BatchNorm2d(filters)]
            if not grow_first:
                rep += [nn.ReLU(), SeparableConv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout)]
            if not start_with_relu:
                rep = rep[1:]
            if strides != 1:
                rep.append(nn.MaxPool2d(3, strides, 1))
            self.rep = nn.Sequential(*rep)

        def forward(self, inp):
            skip = inp if self.skip is None else self.skipbn(self.skip(inp))
            return self.rep(inp) + skip

    class Xception(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
            self.bn1 = nn.BatchNorm2d(32)
            self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
            self.bn2 = nn.BatchNorm2d(64)
            self.block1 = Block(64, 128, 2, 2, start_with_relu=False)
            self.block2 = Block(128, 256, 2, 2)
            self.block3 = Block(256, 728, 2, 2)
            for i in range(4, 12):
                setattr(self, f"block{i}", Block(728, 728, 3, 1))
            self.block12 = Block(728, 1024, 2, 2, grow_first=False)
            self.conv3 = SeparableConv2d(1024, 1536, 3, 1, 1)
            self.bn3 = nn.BatchNorm2d(1536)
            self.conv4 = SeparableConv2d(1536, 2048, 3, 1, 1)
            self.bn4 = nn.BatchNorm2d(2048)
            self.last_linear = nn.Linear(2048, 2)
            self.adjust_channel = nn.Sequential(
                nn.Conv2d(2048, 512, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=False))

        def features(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            for i in range(1, 13):
                x = getattr(self, f"block{i}")(x)
            x = torch.relu(self.bn3(self.conv3(x)))
            return self.bn4(self.conv4(x))

    class XceptionDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Xception()

        def pooled(self, x):  # Their classifier(): ReLU, adaptive average pool.
            return torch.relu(self.backbone.features(x)).mean((2, 3))

        def forward(self, x):  # Their forward(): prob = softmax(last_linear(.))[:, 1].
            return torch.softmax(self.backbone.last_linear(self.pooled(x)), dim=1)[:, 1]

    return XceptionDetector().eval()


def faces() -> np.ndarray:
    """Four distinct natural images (scikit-image's), uint8 256x256: unlike noise, they give
    well-separated features."""
    import cv2
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    resized = [cv2.resize(p, (SIDE, SIDE), interpolation=cv2.INTER_AREA) for p in photos]
    return np.stack(resized)


def test_detector_import_gives_their_probabilities(tmp_path):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = deepfakebench_detector(torch)
    randomize_batch_norm(model, generator)
    images = faces()
    # In [-1, 1] as their loader normalizes (mean 0.5, std 0.5).
    x = torch.from_numpy((images.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    with torch.inference_mode():  # A head that spreads these faces' probabilities over (0, 1).
        pooled = model.pooled(x)
        w = torch.randn(2, 2048, generator=generator)
        mean = pooled.mean(0)  # Random deep features share most of their length: project it out.
        w -= (w @ mean)[:, None] * mean / (mean @ mean)
        z = pooled @ (w[1] - w[0])
        w /= z.std()
        model.backbone.last_linear.weight.copy_(w)
        model.backbone.last_linear.bias.copy_(torch.tensor([0.3, 0.3 - float(z.mean() / z.std())]))
        theirs = model(x).numpy()
    assert 0.02 < theirs.min() and theirs.max() < 0.98 and np.ptp(theirs) > 0.1
    state_dict = model.state_dict()
    for key in ("backbone.block1.rep.0.conv1.weight", "backbone.block12.rep.4.pointwise.weight",
                "backbone.conv4.pointwise.weight", "backbone.bn4.running_var",
                "backbone.last_linear.weight", "backbone.adjust_channel.1.running_mean"):
        assert key in state_dict  # Names as in their xception.py / xception_detector.py.
    path = tmp_path / "xception_best.pth"
    torch.save(state_dict, path)
    out = tmp_path / "imported"
    assert main.main(["import-weights", "--format", "deepfakebench", "--input", str(path),
                      "--output", str(out)]) == 0

    config = weights.detector_config(out)
    assert (config.model.image_size, config.model.bn_epsilon, config.model.pool_padding,
            config.model.classifier.hidden) == (SIDE, 1e-5, "torch", ())
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    state = train_step.create_train_state(config, train_step.abstract_state(config, mesh))
    graphdef, _, _ = models.abstract_model(config.model)
    logits = jax.jit(lambda p, s, x: models.forward(graphdef, p, s, x, train=False)[0]["logit"])(
        state.params, state.batch_stats, images)
    ours = np.asarray(jax.nn.sigmoid(logits))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

    # The same faces as a prepared test set, scored by `evaluate --protocol deepfakebench`.
    labels = [1, 0, 0, 1]
    data = tmp_path / "Celeb-DF-v2"
    writer.write_dataset(data, "deepfakebench", {"test": [
        {"image": im, "label": label,
         "dataset": "deepfakebench", "method": "CelebDFv2_fake" if label else "CelebDFv2_real",
         "compression": "c23", "video_id": f"v{i}", "frame_index": 0,
         "face_box": np.zeros(4, np.float32), "fps": 0.0}
        for i, (im, label) in enumerate(zip(images, labels, strict=True))]})
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["deepfakebench"] = {"name": "Celeb-DF-v2", "compression": "c23"}
    (data / "manifest.json").write_text(json.dumps(manifest))
    report_path = tmp_path / "metrics.json"
    assert main.main(["evaluate", "--checkpoint", str(out), "--data", str(data),
                      "--out", str(report_path), "--batch-size", "8",
                      "--protocol", "deepfakebench"]) == 0
    [row] = json.loads(report_path.read_text())["deepfakebench"]
    assert row["dataset"] == "Celeb-DF-v2" and row["published_frame_auc"] == 0.7365
    assert row["frame_auc"] == pytest.approx(skm.roc_auc_score(labels, theirs))
    assert row["acc"] == pytest.approx(np.mean((theirs > 0.5) == np.array(labels, bool)))
    table = (tmp_path / "metrics_deepfakebench.md").read_text()
    lo, hi = row["frame_auc_ci"]
    assert lo <= row["frame_auc"] <= hi
    assert (f"| Celeb-DF-v2 | {row['frame_auc']:.4f} | [{lo:.4f}, {hi:.4f}] | 0.7365 |"
            in table)


def test_pickled_objects_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.pth"
    torch.save({"backbone.x": torch.zeros(1), "hook": pytest.Cache}, path)  # A class: pickled.
    with pytest.raises(SystemExit, match="weights_only=True"):
        weights.read_torch_state_dict(path)
