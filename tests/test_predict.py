"""``focas-keras predict``: request format and outputs against a fake TF Serving REST server
(answers like the real one, from canned detections), gRPC request building, and errors.

The clients against servers running a real export are in test_export.py.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import base64  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from focas_keras.datasets.annotations import load_image  # noqa: E402
from focas_keras.cli import main  # noqa: E402
from focas_keras.errors import InputError  # noqa: E402
from focas_keras.export import client as client_module  # noqa: E402

D = 4
#: Canned answer: two candidates (one accepted) in Model Garden's [ymin, xmin, ymax, xmax].
ANSWER = {"detection_boxes": [[10.0, 20.0, 30.0, 44.0], [2.5, 0.0, 12.5, 9.0]] + [[0.0] * 4] * 2,
          "detection_scores": [0.91234, 0.2, 0.0, 0.0],
          "detection_det_scores": [0.8, 0.65, 0.0, 0.0],
          "detection_classes": [1, 0, 0, 0],
          "num_detections": 2}


class FakeServing:
    """An in-process HTTP server answering ``:predict`` like TF Serving's REST API."""

    def __init__(self, status=200, answer=None):
        self.requests = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, self.headers["Content-Type"], body))
                if status == 200:
                    payload = answer or {"predictions": [ANSWER] * len(body["instances"])}
                else:
                    payload = {"error": "assertion failed: [image_bytes: image too large: "
                                        "height x width must be <= 100 pixels; got] [40 30]"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def images(tmp_path):
    """A PNG and a JPEG field (40 x 30 and 50 x 64)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (30, 40, 3)), ("b.jpg", (64, 50, 3))):
        cv2.imwrite(str(folder / name), rng.integers(0, 256, shape, dtype=np.uint8))
    return folder


def test_rest_request_format_and_outputs(images, tmp_path):
    out = tmp_path / "out"
    with FakeServing() as fake:
        result = CliRunner().invoke(main, ["predict", str(images), "--rest", fake.url + "/",
                                           "--model", "fc", "--version", "3", "--out", str(out),
                                           "--mpp", "0.25"])
    assert result.exit_code == 0, result.output
    assert "2 mitoses accepted of 4 candidates in 2 images" in result.output
    assert [r[0] for r in fake.requests] == ["/v1/models/fc/versions/3:predict"] * 2
    for (path, content_type, body), name in zip(fake.requests, ("a.png", "b.jpg")):
        assert content_type == "application/json"
        assert body["signature_name"] == "serving_bytes" and len(body["instances"]) == 1
        sent = base64.b64decode(body["instances"][0]["image_bytes"]["b64"])
        assert sent.startswith(b"\x89PNG")  # lossless: the server sees detect's pixels
        pixels = cv2.cvtColor(cv2.imdecode(np.frombuffer(sent, np.uint8), cv2.IMREAD_COLOR),
                              cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(pixels, load_image(images / name))
    table = pd.read_csv(out / "detections.csv")
    assert list(table.columns) == ["image", "x", "y", "x1", "y1", "x2", "y2", "det_score",
                                   "cls_score", "accepted"]
    first = table.iloc[0]
    assert (first.image, first.x1, first.y1, first.x2, first.y2) == ("a", 20.0, 10.0, 44.0, 30.0)
    assert (first.x, first.y, first.det_score, first.cls_score) == (32.0, 20.0, 0.8, 0.9123)
    assert table.accepted.tolist() == [True, False, True, False]
    assert table.image.tolist() == ["a", "a", "b", "b"]
    counts = pd.read_csv(out / "counts.csv")
    assert counts.accepted.tolist() == [1, 1] and counts.candidates.tolist() == [2, 2]
    assert counts.width_px.tolist() == [40, 50] and counts.height_px.tolist() == [30, 64]
    np.testing.assert_allclose(counts.area_mm2, [40 * 30 * 0.0625e-6, 50 * 64 * 0.0625e-6])
    geo = json.loads((out / "detections.geojson").read_text())
    assert len(geo["features"]) == 2
    assert geo["features"][0]["geometry"]["coordinates"][0][0] == [20.0, 10.0]
    assert (out / "geojson" / "b.geojson").is_file() and (out / "overlays" / "a.jpg").is_file()
    meta = json.loads((out / "predict.json").read_text())
    assert meta["server"]["transport"] == "rest" and meta["model"] == "fc"
    assert meta["version"] == 3 and meta["totals"] == {"images": 2, "candidates": 4,
                                                       "accepted": 2}


def test_columnar_outputs_answer_is_read_too():
    answer = {"outputs": {key: [value] for key, value in ANSWER.items()}}
    outputs = client_module.parse_rest_answer(answer)
    assert outputs["detection_boxes"].shape == (1, D, 4)
    assert outputs["num_detections"].tolist() == [2]


def _assert_one_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("predict: ")]  # tqdm's progress bar
    assert len(lines) == 1 and lines[0].startswith("focas-keras: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_server_error_is_one_line_and_writes_nothing(images, tmp_path):
    with FakeServing(status=400) as fake:
        result = CliRunner().invoke(main, ["predict", str(images / "a.png"), "--rest", fake.url,
                                           "--out", str(tmp_path / "out")])
    _assert_one_line(result, "a.png", "server answered 400", "image too large")
    assert not (tmp_path / "out").exists()


def test_answer_without_cascade_outputs(images, tmp_path):
    with FakeServing(answer={"predictions": [{"probabilities": 0.5}]}) as fake:
        result = CliRunner().invoke(main, ["predict", str(images), "--rest", fake.url,
                                           "--out", str(tmp_path / "out")])
    _assert_one_line(result, "lacks detection_boxes", "focas-keras cascade export")


def test_unreachable_server(images, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = CliRunner().invoke(main, ["predict", str(images), "--rest",
                                       f"http://127.0.0.1:{port}", "--out", str(tmp_path / "o"),
                                       "--timeout", "5"])
    _assert_one_line(result, "cannot reach the server")


@pytest.mark.parametrize("flags, needle", [
    ([], "give exactly one of --server"),
    (["--server", "h:8500", "--rest", "http://h:8501"], "give exactly one of --server"),
    (["--rest", "h:8501"], "must be an http:// or https:// URL"),
])
def test_bad_server_flags(images, tmp_path, flags, needle):
    result = CliRunner().invoke(main, ["predict", str(images), "--out", str(tmp_path / "o")]
                                + flags)
    _assert_one_line(result, needle)


def test_grpc_without_the_serve_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(InputError, match=r'pip install "focas_keras\[serve\]"'):
        client_module.make_client(server="localhost:8500")


def test_grpc_request():
    pytest.importorskip("tensorflow_serving.apis")
    import tensorflow as tf

    with pytest.raises(InputError, match="HOST:PORT"):
        client_module.GrpcClient("http://localhost:8500")
    grpc_client = client_module.GrpcClient("localhost:8500", "fc", 2)
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    request = grpc_client.request(image)
    grpc_client.close()
    assert request.model_spec.name == "fc" and request.model_spec.version.value == 2
    assert request.model_spec.signature_name == "serving_default"
    tensor = tf.make_ndarray(request.inputs["images"])
    assert tensor.dtype == np.uint8 and tensor.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(tensor[0], image)
