"""`cae-jax serve`: a bundle as an HTTP service (Starlette on uvicorn; docs/serving.md).

- TF Serving's REST API, so its clients work unchanged: `GET /v1/models/NAME`,
  `GET /v1/models/NAME/metadata`, `POST /v1/models/NAME:predict` (`instances` or `inputs` of
  uint8 face crops; `signature_name` "serving_default" or "reconstruct").
- `POST /v1/score`: an image or video (multipart or raw body) -> per-face boxes, scores and
  labels at the bundle's operating point, optionally heatmap PNGs; `scoring.score_media`, the
  path `predict` takes, so both give the same scores.
- `GET /`: a page to drop an image or video on (`serve_page.html`); `GET /sample.png` a face
  to try it with.
- `GET /healthz` (alive), `GET /readyz` (model compiled, not draining), `GET /v1/stats`.

Concurrent requests share model calls (`model_batcher`): faces wait up to `--max-wait-ms`
for others, up to `--max-batch` faces, then one call scores them all. Uploads share face
detection the same way (`BatchedDetector`), without waiting: the frames of uploads that
arrived while the detector was busy are detected together in its next call. Decoding and
cropping run in worker threads, beside both calls. Bad input is a 4xx JSON `{"error": ...}`
naming the problem. SIGTERM stops accepting connections, lets requests in flight finish
(uvicorn's graceful shutdown), then stops the batchers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from cae_jax import heatmap, predict, scoring, serving
from data_prep import faces, video

SIGNATURES = {"serving_default": "classify", "reconstruct": "reconstruct"}
INPUT_NAME = "images"  # The SavedModel's input name, as TF Serving clients send it.


class Problem(Exception):
    """A request's fault: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


DETECT_FRAMES = 64  # Frames detected together at most: several photos, or two videos.


@dataclasses.dataclass
class _Job:
    kind: str  # The jobs of one kind in a batch share one call.
    items: Sequence  # Face crops (uint8 [N, S, S, 3]) or frames (RGB arrays).
    future: concurrent.futures.Future


def _split(outputs: dict | list, lengths: list[int]) -> list:
    """One call's outputs (a mapping of arrays, or a list) -> each job's rows."""
    bounds = np.cumsum([0, *lengths]).tolist()
    if isinstance(outputs, dict):
        return [{k: v[a:b] for k, v in outputs.items()} for a, b in itertools.pairwise(bounds)]
    return [outputs[a:b] for a, b in itertools.pairwise(bounds)]


class Batcher:
    """One thread owns a resource (the model, the face detector); requests queue their inputs
    and wait for their rows of its outputs.

    A batch starts with the oldest job and takes more until `max_batch` items, waiting for
    them up to `max_wait_s` after it started, then taking those already queued (so with 0 an
    idle service waits for nothing, and a busy one batches what piled up during the last
    call); each kind of job in it is one `call(kind, [items of each job])`, which returns
    each job's outputs. When a shared call fails, its jobs are run one by one, so one
    request's bad input fails that request only.
    """

    def __init__(self, call: Callable[[str, list], list], max_batch: int, max_wait_s: float,
                 name: str = "batcher"):
        self.call = call
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.calls = 0  # Calls made (GET /v1/stats).
        self.jobs = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: str, items: Sequence) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(kind, items, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, size = [first], len(first.items)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while size < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
                size += len(job.items)
            for kind in dict.fromkeys(job.kind for job in batch):
                self._run([job for job in batch if job.kind == kind])
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        self.calls += 1
        try:
            outputs = self.call(jobs[0].kind, [job.items for job in jobs])
        except Exception as err:  # noqa: BLE001 - the waiting request gets the failure.
            if len(jobs) > 1:  # Whose input failed the call: each job alone.
                for job in jobs:
                    self._run([job])
            else:
                self.jobs += 1
                jobs[0].future.set_exception(err)
            return
        self.jobs += len(jobs)
        for job, rows in zip(jobs, outputs, strict=True):
            job.future.set_result(rows)


def model_batcher(predictor: serving.Predictor, max_batch: int, max_wait_s: float) -> Batcher:
    """Requests' face crops scored together: kinds "classify" and "reconstruct"."""

    def call(signature: str, crops: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        faces_in = np.concatenate(crops)
        outputs = (predictor.reconstruct(faces_in) if signature == "reconstruct"
                   else {"probability": predictor.predict_proba(faces_in)})
        return _split(outputs, [len(c) for c in crops])

    return Batcher(call, max_batch, max_wait_s, name="model")


class BatchedDetector:
    """The service's face detector (`faces.FaceDetector`): one thread owns the detector, and
    the frames of requests waiting together are detected in one `detect_many` call (MTCNN
    batches frames of one size; its per-call cost is paid once per batch, not per request).
    Each frame's detections are what detecting it alone gives."""

    def __init__(self, detector: faces.FaceDetector):
        def call(kind: str, frames: list[list[np.ndarray]]) -> list[list]:
            found = detector.detect_many([f for request in frames for f in request])
            return _split(found, [len(request) for request in frames])

        self.batcher = Batcher(call, DETECT_FRAMES, 0.0, name="detector")

    def detect(self, rgb: np.ndarray) -> list[faces.Detection]:
        return self.detect_many([rgb])[0]

    def detect_many(self, frames: list[np.ndarray]) -> list[list[faces.Detection]]:
        """Blocking, for `scoring.score_media` running in a worker thread."""
        return self.batcher.submit("detect", frames).result()


@dataclasses.dataclass
class Service:
    """What the handlers share: the model, its decision and the request limits."""

    name: str
    predictor: serving.Predictor
    batcher: Batcher  # The model's (`model_batcher`).
    face_options: faces.FaceOptions  # Its detector a `BatchedDetector`, or NO_DETECTION.
    threshold: float
    decision: str
    max_body_bytes: int
    request_timeout_s: float
    ready: bool = False

    def reconstruct(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """The model's outputs for one request's crops, scored with other requests'; blocking,
        for `scoring.score_media` running in a worker thread."""
        return self.batcher.submit("reconstruct", crops).result()

    @property
    def detections(self) -> Batcher | None:
        """The face detector's batcher (None without detection)."""
        detector = self.face_options.detector
        return detector.batcher if isinstance(detector, BatchedDetector) else None


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading the rest."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise Problem(413, f"request body of {length} bytes is larger than --max-body-bytes "
                      f"{limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"request body is larger than --max-body-bytes {limit}")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's own body cache: form() parses these bytes.
    return body


async def _upload(request, limit: int) -> tuple[bytes, str]:
    """(bytes, name) of the uploaded file: a multipart form's first file, else the body."""
    body = await _read_body(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body, request.query_params.get("name", "upload")
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as err:  # noqa: BLE001 - Starlette's parser raises several kinds.
        raise Problem(400, f"malformed multipart form: {err}") from err
    upload = next((v for v in form.values() if hasattr(v, "filename")), None)
    if upload is None:
        raise Problem(400, "the multipart form holds no file (send it as a file field)")
    return await upload.read(), upload.filename or "upload"


def _predict_request(body: bytes, image_size: int) -> tuple[str, np.ndarray, bool]:
    """A TF Serving `:predict` body -> (signature name, face crops, whether rows)."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Problem(400, f"the body is not JSON: {err}") from err
    if not isinstance(payload, dict):
        raise Problem(400, "the body must be a JSON object")
    signature = payload.get("signature_name", "serving_default")
    if signature not in SIGNATURES:
        raise Problem(400, f"signature_name {signature!r}: not one of {sorted(SIGNATURES)}")
    return (signature, *_face_crops(payload, image_size))


def _predict_answer(signature: str, outputs: dict[str, np.ndarray], row: bool) -> bytes:
    """TF Serving's answer: `predictions` (rows) or `outputs` (columns); the classifier's
    is the probabilities alone."""
    if signature == "serving_default":
        result = outputs["probability"].tolist()
        answer = {"predictions": result} if row else {"outputs": result}
    else:
        lists = {k: v.tolist() for k, v in outputs.items()}
        answer = {"predictions": [dict(zip(lists, values, strict=True))
                                  for values in zip(*lists.values(), strict=True)]
                  } if row else {"outputs": lists}
    return json.dumps(answer, allow_nan=False, separators=(",", ":")).encode()


def _face_crops(payload: dict, image_size: int) -> tuple[np.ndarray, bool]:
    """uint8 [N, S, S, 3] from a TF Serving body's `instances` (row format) or `inputs`
    (columnar format), each either the tensor or {"images": tensor}; and which it was."""
    if ("instances" in payload) == ("inputs" in payload):
        raise Problem(400, 'the body needs exactly one of "instances" or "inputs"')
    row = "instances" in payload
    value = payload["instances" if row else "inputs"]
    if row and isinstance(value, list) and value and isinstance(value[0], dict):
        if any(set(v) != {INPUT_NAME} for v in value):
            raise Problem(400, f'each instance must hold only the input "{INPUT_NAME}"')
        value = [v[INPUT_NAME] for v in value]
    elif isinstance(value, dict):
        if set(value) != {INPUT_NAME}:
            raise Problem(400, f'the only input is "{INPUT_NAME}", got {sorted(value)}')
        value = value[INPUT_NAME]
    try:
        array = np.asarray(value)
    except ValueError as err:  # Ragged nesting.
        raise Problem(400, f"input is not a rectangular tensor: {err}") from err
    expected = f"uint8 [N, {image_size}, {image_size}, 3]"
    if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
        raise Problem(400, f"input must be integers in 0..255 ({expected}), got "
                      f"{'values outside 0..255' if array.dtype.kind in 'iu' else array.dtype}")
    try:
        return serving.check_images(array.astype(np.uint8), image_size), row
    except ValueError as err:
        raise Problem(400, str(err)) from err


def _heatmap_pngs(scored: scoring.Scored) -> list[str]:
    scale = heatmap.error_scale(scored.error_maps)
    pngs = []
    for crop, err in zip(scored.crops, scored.error_maps, strict=True):
        picture = cv2.cvtColor(heatmap.overlay(crop, err, scale), cv2.COLOR_RGB2BGR)
        pngs.append(base64.b64encode(cv2.imencode(".png", picture)[1].tobytes()).decode())
    return pngs


def _score_upload(service: Service, data: bytes, name: str, with_heatmaps: bool) -> dict:
    """Runs in a worker thread: decode, detect, crop, score (detection and model calls
    through their batchers, shared with other requests)."""
    try:
        media = scoring.read_bytes(data, service.face_options.frames_per_video, name)
        scored = scoring.score_media(media, service.reconstruct,
                                     service.predictor.image_size, service.face_options,
                                     service.threshold)
    except video.UnreadableMediaError as err:
        raise Problem(415, str(err)) from err
    except cv2.error as err:
        raise Problem(415, f"{name}: {err.msg or err}") from err
    if scored.entry["status"] == "no_face":
        raise Problem(422, f"{name}: no face found in {len(media.frames)} "
                      f"{'frame' if media.kind == 'image' else 'sampled frames'}")
    result = {"name": name, **scored.entry, "threshold": service.threshold,
              "decision": service.decision}
    if with_heatmaps:
        for frame, png in zip(result["frames"], _heatmap_pngs(scored), strict=True):
            frame["heatmap_png"] = png
    return result


def _compile(predictor: serving.Predictor) -> None:
    """Both signatures at every padded batch size, before the server says it is ready."""
    size = predictor.image_size
    for count in predictor.bucket_sizes:
        faces = np.zeros((count, size, size, 3), np.uint8)
        predictor.predict_proba(faces)
        predictor.reconstruct(faces)


def make_app(service: Service):
    """The Starlette application of one bundle."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    async def limited(work):
        try:
            return await asyncio.wait_for(work, service.request_timeout_s)
        except TimeoutError as err:
            raise Problem(503, f"the request took longer than --request-timeout "
                          f"{service.request_timeout_s:g} s") from err

    def check_name(request) -> None:
        name = request.path_params["name"]
        if name != service.name:
            raise Problem(404, f"no model named {name!r}; this server serves {service.name!r}")

    async def page(request):
        return HTMLResponse(resources.files("cae_jax").joinpath("serve_page.html").read_text())

    async def sample(request):  # scikit-image's astronaut photo (no download): a face to try.
        from skimage import data

        png = cv2.imencode(".png", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1]
        return Response(png.tobytes(), media_type="image/png")

    async def healthz(request):
        return JSONResponse({"status": "ok"})

    async def readyz(request):
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    async def stats(request):
        counts = {"model_calls": service.batcher.calls,
                  "batched_requests": service.batcher.jobs}
        if service.detections is not None:
            counts.update(detector_calls=service.detections.calls,
                          detected_requests=service.detections.jobs)
        return JSONResponse(counts)

    async def model_status(request):
        check_name(request)
        return JSONResponse({"model_version_status": [{
            "version": "1", "state": "AVAILABLE" if service.ready else "LOADING",
            "status": {"error_code": "OK", "error_message": ""}}]})

    async def metadata(request):
        check_name(request)
        size = service.predictor.image_size

        def tensor(dims: list[int], dtype: str, name: str) -> dict:
            return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""}
                                                             for d in dims],
                                                     "unknown_rank": False}, "name": name}

        inputs = {INPUT_NAME: tensor([-1, size, size, 3], "DT_UINT8", "images:0")}
        outputs = {"probability": tensor([-1], "DT_FLOAT", "probability")}
        full = {**outputs,
                "reconstruction": tensor([-1, size, size, 3], "DT_FLOAT", "reconstruction"),
                "error_map": tensor([-1, size, size], "DT_FLOAT", "error_map")}
        signatures = {name: {"inputs": inputs, "outputs": outs,
                             "method_name": "tensorflow/serving/predict"}
                      for name, outs in (("serving_default", outputs), ("reconstruct", full))}
        return JSONResponse({
            "model_spec": {"name": service.name, "signature_name": "", "version": "1"},
            "metadata": {"signature_def": {"signature_def": signatures},
                         "operating_point": {"threshold": service.threshold,
                                             "decision": service.decision}}})

    async def tf_predict(request):
        check_name(request)
        body = await _read_body(request, service.max_body_bytes)
        # Parsing the tensors and writing the answer's are long for large crops: in worker
        # threads, so that the event loop goes on serving other requests meanwhile.
        signature, crops, row = await run_in_threadpool(_predict_request, body,
                                                        service.predictor.image_size)
        future = service.batcher.submit(SIGNATURES[signature], crops)
        outputs = await limited(asyncio.wrap_future(future))
        return Response(await run_in_threadpool(_predict_answer, signature, outputs, row),
                        media_type="application/json")

    async def score(request):
        data, name = await _upload(request, service.max_body_bytes)
        with_heatmaps = request.query_params.get("heatmap", "0") not in ("0", "false", "")
        result = await limited(run_in_threadpool(_score_upload, service, data, name,
                                                 with_heatmaps))
        return JSONResponse(result)

    async def problem(request, err: Problem):
        return _error(err.status, str(err))

    async def http_error(request, err: HTTPException):
        return _error(err.status_code, f"{request.method} {request.url.path}: {err.detail}")

    async def unexpected(request, err: Exception):  # Never a traceback to the client.
        print(f"serve: {request.method} {request.url.path}: {type(err).__name__}: {err}",
              file=sys.stderr)
        return _error(500, f"internal error: {type(err).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(_compile, service.predictor)
        service.ready = True
        yield
        service.ready = False
        await run_in_threadpool(service.batcher.close)
        if service.detections is not None:
            await run_in_threadpool(service.detections.close)

    routes = [
        Route("/", page),
        Route("/sample.png", sample),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/stats", stats),
        Route("/v1/score", score, methods=["POST"]),
        Route("/v1/models/{name}:predict", tf_predict, methods=["POST"]),
        Route("/v1/models/{name}/metadata", metadata),
        Route("/v1/models/{name}", model_status),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        Problem: problem, HTTPException: http_error, Exception: unexpected})


def build_service(args: argparse.Namespace) -> Service:
    """The service of `args.model` (raises OSError/ValueError for a bad bundle or flag)."""
    predictor = serving.load_bundle(args.model, batch_size=args.max_batch, buckets=True)
    if args.threshold is None:
        threshold, decision = serving.decision_threshold(predictor.meta,
                                                         args.operating_point or "")
    else:
        threshold, decision = args.threshold, "--threshold"
    options = predict.face_options(args)
    if options.detector != faces.NO_DETECTION:
        detector = BatchedDetector(faces.make_detector(args.detector, args.align))
        options = dataclasses.replace(options, detector=detector)
    return Service(
        name=args.model_name or Path(args.model).absolute().name, predictor=predictor,
        batcher=model_batcher(predictor, args.max_batch, args.max_wait_ms / 1000),
        face_options=options, threshold=threshold, decision=decision,
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="bundle directory from `cae-jax export`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8501,
                        help="port (TF Serving's REST port by default; 0: any free port)")
    parser.add_argument("--model-name", help="NAME in /v1/models/NAME (default: the bundle "
                        "directory's name)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="faces scored together in one model call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a request's faces wait for others to share a call")
    parser.add_argument("--max-body-bytes", type=int, default=64 << 20,
                        help="largest request body (413 beyond)")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="seconds a request may take (503 beyond)")
    predict.add_decision_arguments(parser)
    predict.add_face_arguments(parser)


def flag_error(args: argparse.Namespace) -> str | None:
    if not 0 <= args.port < 65536:
        return f"--port must be in 0..65535, got {args.port}"
    if args.max_batch < 1:
        return f"--max-batch must be at least 1, got {args.max_batch}"
    if not args.max_wait_ms >= 0:
        return f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}"
    if args.max_body_bytes < 1:
        return f"--max-body-bytes must be at least 1, got {args.max_body_bytes}"
    if not args.request_timeout > 0:
        return f"--request-timeout must be positive, got {args.request_timeout}"
    return predict.face_flag_error(args)


def make_server(service: Service):
    """uvicorn serving `make_app(service)`; on SIGTERM it waits for requests in flight (up to
    the request timeout), then runs the app's shutdown (the batcher stops)."""
    import uvicorn

    config = uvicorn.Config(make_app(service), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=service.request_timeout_s)
    return uvicorn.Server(config)


def run(args: argparse.Namespace) -> int:
    problem = flag_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as err:
        print(f"error: --host {args.host} --port {args.port}: cannot listen there "
              f"({err.strerror or err})", file=sys.stderr)
        return 2
    try:
        service = build_service(args)
    except (OSError, ValueError) as err:
        sock.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    print(f"serving {service.name} on http://{host}:{port} (deciding at "
          f"{service.threshold:.4f}: {service.decision})", file=sys.stderr, flush=True)
    # uvicorn finishes the requests in flight on SIGTERM/SIGINT, then raises the signal again
    # for the handler it found: this one, so the command ends with its own line.
    received = []
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        make_server(service).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    why = f" on {signal.Signals(received[0]).name}" if received else ""
    print(f"serve: stopped{why} ({service.batcher.jobs} batched requests, "
          f"{service.batcher.calls} model calls)", file=sys.stderr)
    return 0

