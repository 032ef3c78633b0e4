"""Face detection, tracking and cropping: frames -> square face crops around one person.

`crop_media` is the one path from read frames to face crops: `prepare` caches its crops,
`predict` and `serve` score them.

Detectors whose models ship inside installed packages (nothing is fetched at run time):
  mtcnn  MTCNN (the `mtcnn` package, TensorFlow), batched over a video's frames, with five
         landmarks. Default: the best recall, and fast enough once batched.
  haar   OpenCV's frontal-face Haar cascade (in opencv-python), coarse to fine. The fastest.
  dlib   dlib's HOG detector per full-resolution frame, upsampled once: the paper's choice and
         the usual deepfake-benchmark preprocessing (optional extra `cae-jax[dlib]`).
docs/prepare.md has the recall and speed measurements behind the default.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple, Protocol

import cv2
import numpy as np

from data_prep import video

DEFAULT_DETECTOR = "mtcnn"
NO_DETECTION = "none"  # Frames taken whole: they are face crops already.


class Detection(NamedTuple):
    box: np.ndarray  # x0, y0, x1, y1 in pixels of the frame given to `detect`.
    score: float
    eyes: np.ndarray | None  # [[x, y] of the eye on the image's left, [x, y] right], or None.


class FaceDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Detection]: ...

    def detect_many(self, frames: list[np.ndarray]) -> list[list[Detection]]: ...


class _OneByOne:
    """`detect_many` for detectors without a batched path."""

    def detect_many(self, frames: list[np.ndarray]) -> list[list[Detection]]:
        return [self.detect(f) for f in frames]


def _downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrinks so the longer side is at most max_side; returns the image and its scale."""
    scale = min(1.0, max_side / max(rgb.shape[:2])) if max_side else 1.0
    if scale == 1.0:
        return rgb, 1.0
    size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


class HaarDetector(_OneByOne):
    """OpenCV's Viola-Jones cascade: fast on CPU, frontal faces; eyes from the eye cascade."""

    def __init__(
        self,
        find_eyes: bool = False,
        max_sides: tuple[int, ...] = (320, 640),
        min_face_fraction: float = 0.08,
        scale_factor: float = 1.1,
    ):
        root = cv2.data.haarcascades
        self.faces = cv2.CascadeClassifier(
            os.path.join(root, "haarcascade_frontalface_default.xml")
        )
        self.eyes = cv2.CascadeClassifier(os.path.join(root, "haarcascade_eye.xml"))
        if self.faces.empty() or self.eyes.empty():
            raise RuntimeError(f"OpenCV Haar cascades missing under {root}")
        self.find_eyes = find_eyes
        self.max_sides = max_sides
        self.min_face_fraction = min_face_fraction
        self.scale_factor = scale_factor

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Coarse to fine: a small copy finds large faces fast; a larger one the rest."""
        for max_side in self.max_sides:
            detections = self._detect(rgb, max_side)
            if detections:
                break
        return detections

    def _detect(self, rgb: np.ndarray, max_side: int) -> list[Detection]:
        small, scale = _downscale(rgb, max_side)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        side = max(12, int(self.min_face_fraction * min(gray.shape)))
        found = self.faces.detectMultiScale3(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=5,
            minSize=(side, side),
            outputRejectLevels=True,
        )
        boxes, _, weights = found
        detections = []
        for (x, y, w, h), weight in zip(boxes, np.ravel(weights), strict=True):
            eyes = self._eyes(gray, x, y, w, h) if self.find_eyes else None
            detections.append(
                Detection(
                    np.array([x, y, x + w, y + h], np.float32) / scale,
                    float(weight),
                    None if eyes is None else eyes / scale,
                )
            )
        return detections

    def _eyes(self, gray: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """Two eyes in the upper half of the face, one each side of its middle, else None."""
        upper = gray[y : y + h // 2, x : x + w]
        found = self.eyes.detectMultiScale(upper, 1.1, 3, minSize=(max(4, w // 10),) * 2)
        centres = [(x + ex + ew / 2, y + ey + eh / 2) for ex, ey, ew, eh in found]
        left = [c for c in centres if c[0] < x + w / 2]
        right = [c for c in centres if c[0] >= x + w / 2]
        if not left or not right:
            return None
        return np.array([max(left), min(right)], np.float32)  # The pair closest to the middle.


class MtcnnDetector:
    """MTCNN (Zhang et al. 2016) from the `mtcnn` package: boxes and five landmarks.

    Frames of one size are detected in batches: per-call TensorFlow overhead dominates
    single frames, and a batch pays it once. A frame's detections do not depend on the batch
    it is in (tests/test_prepare.py checks), so batching across videos or requests is free.
    """

    def __init__(self, find_eyes: bool = True, max_side: int = 480, batch_size: int = 16):
        del find_eyes  # Landmarks come with every detection.
        from mtcnn import MTCNN

        self.model = MTCNN()
        self.max_side = max_side
        self.batch_size = batch_size

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        return self.detect_many([rgb])[0]

    def detect_many(self, frames: list[np.ndarray]) -> list[list[Detection]]:
        """Batches of up to `batch_size` frames of one size (after downscaling), in order;
        the `mtcnn` package's own mixed-size batches pad frames, which changes detections."""
        resized = [_downscale(f, self.max_side) for f in frames]
        by_shape: dict[tuple, list[int]] = {}
        for position, (small, _) in enumerate(resized):
            by_shape.setdefault(small.shape, []).append(position)
        out: list[list[Detection]] = [[] for _ in frames]
        for positions in by_shape.values():
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                found = self._detect_batch([resized[i] for i in chunk])
                for position, detections in zip(chunk, found, strict=True):
                    out[position] = detections
        return out

    def _detect_batch(self, resized: list[tuple[np.ndarray, float]]) -> list[list[Detection]]:
        images = [small for small, _ in resized]
        found = self.model.detect_faces(images if len(images) > 1 else images[0], box_format="xyxy")
        found = found if len(images) > 1 else [found]
        return [
            [self._detection(face, scale) for face in faces_in_frame]
            for faces_in_frame, (_, scale) in zip(found, resized, strict=True)
        ]

    @staticmethod
    def _detection(face: dict, scale: float) -> Detection:
        points = face["keypoints"]
        eyes = np.array([points["left_eye"], points["right_eye"]], np.float32)
        eyes = eyes[np.argsort(eyes[:, 0])]
        return Detection(
            np.asarray(face["box"], np.float32) / scale, float(face["confidence"]), eyes / scale
        )


class DlibHogDetector(_OneByOne):
    """dlib's HOG + linear SVM detector, per full frame with one upsampling (DeepfakeBench)."""

    def __init__(self, find_eyes: bool = False, upsample: int = 1):
        del find_eyes  # Landmarks would need a shape-predictor file dlib does not ship.
        try:
            import dlib
        except ImportError as err:
            raise ImportError(
                "--detector dlib needs dlib: pip install 'cae-jax[dlib]' (or dlib-bin)"
            ) from err
        self.model = dlib.get_frontal_face_detector()
        self.upsample = upsample

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        rects, scores, _ = self.model.run(rgb, self.upsample)
        return [
            Detection(np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32), s, None)
            for r, s in zip(rects, scores, strict=True)
        ]


DETECTORS = {"haar": HaarDetector, "mtcnn": MtcnnDetector, "dlib": DlibHogDetector}


@functools.cache
def make_detector(name: str, find_eyes: bool = False) -> FaceDetector:
    """One detector per name and process (models load once; pool workers reuse them).

    `find_eyes` asks for eye positions (for alignment) where they cost extra (haar).
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; choose from {sorted(DETECTORS)}")
    return DETECTORS[name](find_eyes)


def _area(box: np.ndarray) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])])
    i = _area(inter)
    return i / (_area(a) + _area(b) - i + 1e-9)


def pick_faces(detections: list[list[Detection]], track: bool) -> list[Detection | None]:
    """Per frame the chosen face (None where none was found).

    Without tracking each frame keeps its largest face. With tracking, the largest face of the
    first frame with any face is followed: every later frame keeps the face overlapping the
    previous choice most, and the largest only when none overlaps (the person left the frame).
    """
    chosen: list[Detection | None] = []
    previous = None
    for faces in detections:
        if not faces:
            chosen.append(None)
            continue
        best = max(faces, key=lambda d: _area(d.box))
        if track and previous is not None:
            overlaps = [_iou(d.box, previous.box) for d in faces]
            if max(overlaps) > 0:
                best = faces[int(np.argmax(overlaps))]
        chosen.append(best)
        previous = best
    return chosen


def crop_face(
    rgb: np.ndarray,
    box: np.ndarray,
    image_size: int,
    margin: float,
    eyes: np.ndarray | None = None,
) -> np.ndarray:
    """Square crop of side margin * max(box w, h) centred on the box, resized to image_size.

    With `eyes`, the frame is first rotated about the box centre so the eyes are level
    (landmark alignment). Parts of the square outside the frame are black.
    """
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = margin * max(box[2] - box[0], box[3] - box[1])
    scale = image_size / side
    # One affine warp does rotate + crop + resize: source (cx, cy) -> crop centre.
    angle = 0.0
    if eyes is not None:
        (lx, ly), (rx, ry) = eyes
        angle = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
    matrix = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, scale)
    matrix[:, 2] += (image_size / 2 - cx, image_size / 2 - cy)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(
        rgb, matrix, (image_size, image_size), flags=interpolation, borderValue=(0, 0, 0)
    )


@dataclasses.dataclass
class Faces:
    """Face crops of a sequence of frames; frames where no face was found are left out."""

    crops: np.ndarray  # [K, S, S, 3] uint8 RGB.
    boxes: np.ndarray  # [K, 4] float32 x0, y0, x1, y1 in source-frame pixels.
    kept: np.ndarray  # [K] int64: position of each crop in the input frame list.


def detect_and_crop(
    frames: list[np.ndarray],
    detector: str | FaceDetector = DEFAULT_DETECTOR,
    image_size: int = 299,
    margin: float = 1.3,
    *,
    track: bool = True,
    align: bool = False,
) -> Faces:
    """Finds one face per RGB frame (tracked across frames of a video) and crops it.

    Use `track=False` for unrelated still images. `align=True` levels the eyes where the
    detector gives them (mtcnn; haar when its eye cascade finds both eyes).
    """
    model = make_detector(detector, align) if isinstance(detector, str) else detector
    chosen = pick_faces(model.detect_many(frames), track)
    kept = [i for i, d in enumerate(chosen) if d is not None]
    crops = [
        crop_face(frames[i], chosen[i].box, image_size, margin, chosen[i].eyes if align else None)
        for i in kept
    ]
    return Faces(
        crops=np.stack(crops) if crops else np.zeros((0, image_size, image_size, 3), np.uint8),
        boxes=np.stack([chosen[i].box for i in kept]).astype(np.float32)
        if kept
        else np.zeros((0, 4), np.float32),
        kept=np.asarray(kept, np.int64),
    )


def whole_frames(
    frames: list[np.ndarray], image_size: int, interpolation: int | None = None
) -> Faces:
    """Each frame as its own crop, boxed by the whole frame: frames that are face crops
    already. Resized with `interpolation`, by default area shrinking and linear enlarging."""
    crops = []
    for f in frames:
        default = cv2.INTER_AREA if max(f.shape[:2]) > image_size else cv2.INTER_LINEAR
        crops.append(cv2.resize(f, (image_size, image_size),
                                interpolation=default if interpolation is None else interpolation))
    boxes = [[0.0, 0.0, float(f.shape[1]), float(f.shape[0])] for f in frames]
    return Faces(
        np.asarray(crops, np.uint8).reshape(-1, image_size, image_size, 3),
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.arange(len(frames), dtype=np.int64),
    )


@dataclasses.dataclass(frozen=True)
class FaceOptions:
    """How faces are found and cropped, alike in `prepare`, `predict` and `serve`.

    `detector` is a name, a detector made once (`make_detector`; the service shares one
    across requests), or `NO_DETECTION`: the frames are face crops already, each taken whole
    and resized with `whole_frame_interpolation` (None: area shrinking, linear enlarging)."""

    detector: str | FaceDetector = DEFAULT_DETECTOR
    margin: float = 1.3
    align: bool = False
    frames_per_video: int = 32
    whole_frame_interpolation: int | None = None


@dataclasses.dataclass
class VideoFaces:
    """Face crops of one video (or image, or frame list): the frames where a face was found."""

    crops: np.ndarray  # [K, S, S, 3] uint8 RGB.
    boxes: np.ndarray  # [K, 4] float32 in source-frame pixels.
    frame_indices: np.ndarray  # [K] int64 frame numbers in the video (0 for an image).
    fps: float
    num_sampled: int  # Frames read; K <= num_sampled.


def crop_media(media: video.Media, image_size: int, options: FaceOptions) -> VideoFaces:
    """Frames -> face crops, the one way of `prepare`, `predict` and `serve`: one face per
    frame, tracked through a video's frames, the largest in an image (`detect_and_crop`), or
    whole frames (`NO_DETECTION`)."""
    if options.detector == NO_DETECTION:
        found = whole_frames(media.frames, image_size, options.whole_frame_interpolation)
    else:
        found = detect_and_crop(media.frames, options.detector, image_size, options.margin,
                                track=media.kind != "image", align=options.align)
    return VideoFaces(found.crops, found.boxes, media.indices[found.kept], media.fps,
                      len(media.frames))


def extract_faces(
    path: str | os.PathLike,
    frames_per_video: int = 32,
    image_size: int = 299,
    margin: float = 1.3,
    detector: str | FaceDetector = DEFAULT_DETECTOR,
    *,
    align: bool = False,
    image: bool | None = None,
) -> VideoFaces:
    """Read + detect + crop for one video or image file (`video.read_media`, `crop_media`);
    `image` says which (by default the file's suffix). Raises `video.UnreadableMediaError`."""
    options = FaceOptions(detector, margin, align, frames_per_video)
    return crop_media(video.read_media(path, frames_per_video, image), image_size, options)
