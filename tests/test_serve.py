"""`cae-jax serve` on 127.0.0.1 (an ephemeral port): TF Serving REST calls and uploads give the
scores `predict` gives; concurrent requests share model calls; bad requests get 4xx JSON;
SIGTERM lets a request in flight finish; the page scores a face in headless Chromium."""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import cv2
import numpy as np
import pytest

from cae_jax import main as cli
from cae_jax import serve
from data_prep import faces
from tests import test_predict
from tests.test_predict import HAAR, haar_crop

bundle = test_predict.bundle  # Fixtures: the tiny bundle and the face photo and videos.
media = test_predict.media
SERVE_FLAGS = [*HAAR, "--max-wait-ms", "300", "--max-batch", "16", "--max-body-bytes",
               "3000000"]


def call(url: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; error statuses too."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=body, headers=headers or {},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        assert err.headers["content-type"] == "application/json"
        return err.code, json.loads(err.read())


def wait_ready(url: str) -> None:
    for _ in range(240):  # Compiling the two signatures takes seconds.
        try:
            if call(url, "/readyz")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never became ready")


@pytest.fixture(scope="module")
def server(bundle):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    service = serve.build_service(parser.parse_args(["--model", str(bundle), *SERVE_FLAGS]))
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner = serve.make_server(service)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_ready(url)
    yield url, service
    runner.should_exit = True
    thread.join(timeout=60)


@pytest.fixture(scope="module")
def predicted(bundle, media, tmp_path_factory):
    """`predict`'s report of the photo and the moving video, as the service must match."""
    out = tmp_path_factory.mktemp("predicted") / "preds.json"
    assert cli.main(["predict", "--model", str(bundle), str(media / "astronaut.png"),
                     str(media / "moving.mp4"), *HAAR, "--out", str(out)]) == 0
    return {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())["results"]}


def test_tf_serving_rest_api_gives_the_scores_predict_gives(server, media, predicted, bundle):
    url, _ = server
    name = bundle.name
    photo = cv2.cvtColor(cv2.imread(str(media / "astronaut.png")), cv2.COLOR_BGR2RGB)
    crop, _ = haar_crop(photo)
    expected = predicted["astronaut.png"]["score"]

    assert call(url, f"/v1/models/{name}") == (200, {"model_version_status": [{
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]})
    status, meta = call(url, f"/v1/models/{name}/metadata")
    signatures = meta["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and sorted(signatures) == ["reconstruct", "serving_default"]
    assert [d["size"] for d in signatures["serving_default"]["inputs"]["images"]["tensor_shape"][
        "dim"]] == ["-1", "64", "64", "3"]

    status, rows = call(url, f"/v1/models/{name}:predict", {"instances": [crop.tolist()]})
    assert status == 200 and rows["predictions"][0] == pytest.approx(expected, abs=1e-5)
    status, columns = call(url, f"/v1/models/{name}:predict",
                           {"signature_name": "serving_default",
                            "inputs": {"images": [crop.tolist(), crop.tolist()]}})
    assert status == 200 and columns["outputs"] == pytest.approx([expected] * 2, abs=1e-5)
    status, full = call(url, f"/v1/models/{name}:predict",
                        {"signature_name": "reconstruct", "instances": [{"images": crop.tolist()}]})
    (first,) = full["predictions"]
    assert status == 200 and first["probability"] == pytest.approx(expected, abs=1e-5)
    assert np.shape(first["reconstruction"]) == (64, 64, 3)
    assert np.mean(first["error_map"]) == pytest.approx(
        predicted["astronaut.png"]["frames"][0]["recon_error"], abs=1e-5)


def test_uploads_give_the_scores_predict_gives(server, media, predicted):
    url, _ = server
    photo = (media / "astronaut.png").read_bytes()
    status, raw = call(url, "/v1/score?name=astronaut.png", photo)
    assert status == 200 and raw["kind"] == "image" and raw["label"] in ("real", "fake")
    assert raw["score"] == pytest.approx(predicted["astronaut.png"]["score"], abs=1e-5)
    np.testing.assert_allclose(raw["frames"][0]["box"], predicted["astronaut.png"]["frames"][0][
        "box"], atol=1e-3)
    assert raw["threshold"] == 0.5 and raw["decision"].startswith("0.5 (uncalibrated")

    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"moving.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").encode()
    form += (media / "moving.mp4").read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, clip = call(url, "/v1/score?heatmap=1", form,
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    expected = predicted["moving.mp4"]
    assert status == 200 and (clip["name"], clip["kind"]) == ("moving.mp4", "video")
    assert [f["frame_index"] for f in clip["frames"]] == [f["frame_index"]
                                                          for f in expected["frames"]]
    np.testing.assert_allclose([f["score"] for f in clip["frames"]],
                               [f["score"] for f in expected["frames"]], atol=1e-5)
    png = base64.b64decode(clip["frames"][0]["heatmap_png"])
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)


def test_concurrent_requests_share_model_calls(server, media, predicted, bundle):
    url, service = server
    photo = cv2.cvtColor(cv2.imread(str(media / "astronaut.png")), cv2.COLOR_BGR2RGB)
    crop, _ = haar_crop(photo)
    shifted = [np.roll(crop, k, axis=1) for k in range(8)]
    before = service.batcher.calls
    results = [None] * len(shifted)

    def client(k: int) -> None:
        results[k] = call(url, f"/v1/models/{bundle.name}:predict",
                          {"instances": [shifted[k].tolist()]})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(shifted))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    calls = service.batcher.calls - before
    assert 1 <= calls < len(shifted)  # Eight requests, fewer model calls.
    alone = service.predictor.predict_proba(np.stack(shifted))
    assert [status for status, _ in results] == [200] * len(shifted)
    np.testing.assert_allclose([body["predictions"][0] for _, body in results], alone, atol=1e-5)
    assert call(url, "/v1/stats")[1]["model_calls"] == service.batcher.calls


class GatedDetector:
    """A detector whose first call waits for `release`, so that requests queued meanwhile
    are detected together in its next call; records each call's frame count. Frames that
    are all zero make a call fail, as a detector failing on one request's input would."""

    def __init__(self, inner: faces.FaceDetector):
        self.inner = inner
        self.release = threading.Event()
        self.calls: list[int] = []

    def detect_many(self, frames: list[np.ndarray]) -> list[list[faces.Detection]]:
        self.calls.append(len(frames))
        if len(self.calls) == 1:
            assert self.release.wait(timeout=60)
        if any(not frame.any() for frame in frames):
            raise ValueError("an all-zero frame")
        return self.inner.detect_many(frames)


def queue_behind_a_busy_detector(inner: faces.FaceDetector, requests: list[list[np.ndarray]]):
    """The first request's detection in progress, the others queued behind it: (the gated
    detector, the batcher, futures of the requests' detections in order)."""
    gated = GatedDetector(inner)
    detector = serve.BatchedDetector(gated)
    first = detector.batcher.submit("detect", requests[0])
    while not gated.calls:
        time.sleep(0.01)
    rest = [detector.batcher.submit("detect", frames) for frames in requests[1:]]
    gated.release.set()
    results = [first, *rest]
    concurrent.futures.wait(results, timeout=120)
    detector.batcher.close()
    return gated, detector.batcher, results


def assert_same_detections(got: list[faces.Detection], expected: list[faces.Detection]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.box, b.box)
        np.testing.assert_array_equal(a.eyes, b.eyes)
        assert a.score == b.score


def test_requests_waiting_together_are_detected_in_one_call_as_each_alone(media):
    """MTCNN on the frames of four uploads (a photo, a video's frames, the photo at another
    size, a faceless frame): the three queued behind the first are one detector call, and
    every frame's detections are exactly those of detecting it alone."""
    photo = cv2.cvtColor(cv2.imread(str(media / "astronaut.png")), cv2.COLOR_BGR2RGB)
    requests = [[photo], test_predict.decode_all(media / "moving.mp4")[:4],
                [cv2.resize(photo, (300, 300))], [np.full((128, 128, 3), 90, np.uint8)]]
    mtcnn = faces.make_detector("mtcnn")
    gated, batcher, results = queue_behind_a_busy_detector(mtcnn, requests)
    assert gated.calls == [1, 6] and (batcher.calls, batcher.jobs) == (2, 4)
    for frames, result in zip(requests, results, strict=True):
        found = result.result()
        assert len(found) == len(frames)
        for frame, detections in zip(frames, found, strict=True):
            assert_same_detections(detections, mtcnn.detect(frame))
    assert [len(d) for d in results[0].result()] == [1]


def test_a_request_that_fails_its_shared_detection_fails_alone(media):
    photo = cv2.cvtColor(cv2.imread(str(media / "astronaut.png")), cv2.COLOR_BGR2RGB)
    requests = [[photo], [photo], [np.zeros_like(photo)], [photo[::2, ::2]]]
    haar = faces.make_detector("haar")
    gated, batcher, results = queue_behind_a_busy_detector(haar, requests)
    assert gated.calls == [1, 3, 1, 1, 1]  # The shared call failed: each of its jobs alone.
    assert (batcher.calls, batcher.jobs) == (5, 4)
    with pytest.raises(ValueError, match="an all-zero frame"):
        results[2].result()
    for index in (0, 1, 3):
        (found,) = results[index].result()
        assert_same_detections(found, haar.detect(requests[index][0]))


def test_concurrent_uploads_each_get_their_own_answer(server, media, predicted):
    """Uploads at once (their detection and model calls shared): each gets the faces and
    scores `predict` gives it, or its own 4xx."""
    url, service = server
    bodies = [("astronaut.png", (media / "astronaut.png").read_bytes()),
              ("moving.mp4", (media / "moving.mp4").read_bytes()),
              ("noise.mp4", (media / "noise.mp4").read_bytes()),
              ("notes.txt", b"not media")] * 2
    before = service.detections.jobs
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: call(url, f"/v1/score?name={body[0]}", body[1]),
                                bodies))
    assert [status for status, _ in answers] == [200, 200, 422, 415] * 2
    for (name, _), (status, got) in zip(bodies, answers, strict=True):
        if status != 200:
            assert got["error"].startswith(name)
            continue
        expected = predicted[name]
        assert [(f["frame_index"], f["box"]) for f in got["frames"]] == [
            (f["frame_index"], f["box"]) for f in expected["frames"]]
        np.testing.assert_allclose([f["score"] for f in got["frames"]],
                                   [f["score"] for f in expected["frames"]], atol=1e-5)
    stats = call(url, "/v1/stats")[1]
    assert service.detections.jobs - before == 6  # Each decodable upload detected once.
    assert stats["detected_requests"] == service.detections.jobs
    assert stats["detector_calls"] == service.detections.calls


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("POST", "/v1/score?name=notes.txt", b"not media", 415,
     "notes.txt: neither an image nor a video this build decodes"),
    ("POST", "/v1/score", b"", 415, "upload: empty upload"),
    ("POST", "/v1/models/bundle:predict", {"instances": [[[[0] * 3] * 32] * 32]}, 400,
     "expected uint8 [N, 64, 64, 3] face crops, got shape [1, 32, 32, 3]"),
    ("POST", "/v1/models/bundle:predict", {"instances": [[[[0.5] * 3] * 64] * 64]}, 400,
     "input must be integers in 0..255 (uint8 [N, 64, 64, 3]), got float64"),
    ("POST", "/v1/models/bundle:predict", {"instances": [[[[300] * 3] * 64] * 64]}, 400,
     "input must be integers in 0..255 (uint8 [N, 64, 64, 3]), got values outside 0..255"),
    ("POST", "/v1/models/bundle:predict", b"{not json", 400, "the body is not JSON: "),
    ("POST", "/v1/models/bundle:predict", {"instances": [], "signature_name": "train"}, 400,
     "signature_name 'train': not one of ['reconstruct', 'serving_default']"),
    ("POST", "/v1/models/bundle:predict", {"rows": []}, 400,
     'the body needs exactly one of "instances" or "inputs"'),
    ("GET", "/v1/models/other", None, 404, "no model named 'other'; this server serves "
     "'bundle'"),
    ("GET", "/v1/nothing", None, 404, "GET /v1/nothing: Not Found"),
    ("GET", "/v1/score", None, 405, "GET /v1/score: Method Not Allowed"),
])
def test_bad_requests_get_4xx_json_naming_the_problem(server, method, path, body, status,
                                                      message):
    url, _ = server
    got_status, got = call(url, path, body, method=method)
    assert got_status == status and got["error"].startswith(message), got
    assert "Traceback" not in got["error"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    import http.client

    url, _ = server
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.putrequest("POST", "/v1/score")
    connection.putheader("Content-Length", "3000001")  # Announced; never sent.
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read()) == {
        "error": "request body of 3000001 bytes is larger than --max-body-bytes 3000000"}
    connection.close()


def test_a_faceless_video_is_422(server, media):
    url, _ = server
    status, got = call(url, "/v1/score?name=noise.mp4", (media / "noise.mp4").read_bytes())
    assert (status, got) == (422, {"error": "noise.mp4: no face found in 4 sampled frames"})


def test_sigterm_finishes_the_request_in_flight(bundle, media, tmp_path):
    """A request held in the batcher (--max-wait-ms 3000) when SIGTERM arrives is answered;
    then the server stops, exit status 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cae_jax.main", "serve", "--model", str(bundle), "--port", "0",
         *HAAR, "--max-wait-ms", "3000", "--max-batch", "64"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        assert line.startswith(f"serving {bundle.name} on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split(" ")[0]
        wait_ready(url)
        photo = cv2.cvtColor(cv2.imread(str(media / "astronaut.png")), cv2.COLOR_BGR2RGB)
        crop, _ = haar_crop(photo)
        answer = []
        client = threading.Thread(target=lambda: answer.append(call(
            url, f"/v1/models/{bundle.name}:predict", {"instances": [crop.tolist()]})))
        client.start()
        time.sleep(1.0)  # The request now waits in the batcher for others.
        process.send_signal(signal.SIGTERM)
        client.join(timeout=60)
        assert process.wait(timeout=60) == 0
        (status, body), = answer
        assert status == 200 and 0 <= body["predictions"][0] <= 1
        assert "serve: stopped on SIGTERM (1 batched requests" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_the_page_scores_a_face_in_headless_chromium(server, tmp_path):
    """The page fetches the sample photo, posts it to /v1/score and shows each face's score,
    label and heatmap: Chromium's DOM after its scripts ran holds them."""
    url, _ = server
    _, scored = call(url, "/v1/score?name=sample.png",
                     urllib.request.urlopen(url + "/sample.png", timeout=60).read())
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000",
               "--dump-dom", f"{url}/?sample=1"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180).stdout
    assert 'data-result="' in dom, dom[-2000:]
    shown = json.loads(dom.split('data-result="')[1].split('"')[0].replace("&quot;", '"'))
    assert shown["label"] == scored["label"] and shown["faces"] == len(scored["frames"])
    assert shown["score"] == pytest.approx(scored["score"], abs=1e-6)
    assert dom.count('class="face"') == len(scored["frames"])
    assert 'src="data:image/png;base64,' in dom


def test_bad_flags_and_a_taken_port_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path), "--max-wait-ms", "-1"]) == 2
    assert capsys.readouterr().err == "error: --max-wait-ms must be 0 or more, got -1.0\n"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use")
    assert cli.main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/model.json: not found; is {tmp_path} a `cae-jax export` bundle?\n")


def test_buckets_pad_to_the_next_power_of_two_with_the_same_scores(bundle):
    from cae_jax import serving

    bucketed = serving.load_bundle(bundle, batch_size=6, buckets=True)
    fixed = serving.load_bundle(bundle, batch_size=6)
    assert (bucketed.bucket_sizes, fixed.bucket_sizes) == ([1, 2, 4, 6], [6])
    faces = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    padded = []
    real_fn = bucketed._fns["classify"]
    bucketed._fns["classify"] = lambda weights, images: (padded.append(len(images)),
                                                         real_fn(weights, images))[1]
    np.testing.assert_allclose(bucketed.predict_proba(faces), fixed.predict_proba(faces),
                               atol=1e-5)
    assert padded == [6, 4]  # 9 faces: a full batch of 6, then 3 padded to 4.
