"""A client for the exported cascade on TensorFlow Serving (``focas-keras predict``).

Two transports, one answer:

- gRPC (``--server HOST:8500``): a ``PredictRequest`` of the uint8 pixels to the
  ``serving_default`` signature, through ``tensorflow-serving-api`` (the ``serve`` extra:
  ``pip install "focas_keras[serve]"``), imported only when used.
- REST (``--rest http://HOST:8501``): ``POST /v1/models/<model>[/versions/<v>]:predict`` with
  ``{"signature_name": "serving_bytes", "instances": [{"image_bytes": {"b64": ...}}]}``,
  through ``urllib`` only. The image is sent as a PNG of the pixels ``detect`` would see
  (decoded here, then losslessly re-encoded), so both transports give the server the same
  pixels whatever the file format.

The answer becomes the table of ``Cascade.run`` and is written like ``detect``'s output
(``detections.csv``, ``detections.geojson``, ``geojson/``, ``counts.csv``, ``overlays/``) plus
``predict.json`` (server, model, version answered).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from focas_keras.errors import InputError
from focas_keras.export.graph import (
    BYTES_KEY, BYTES_SIGNATURE, CASCADE_OUTPUTS, DEFAULT_SIGNATURE, IMAGES_KEY)

SERVE_EXTRA_HINT = ('gRPC needs tensorflow-serving-api: pip install "focas_keras[serve]" '
                    "(or use --rest)")


def _encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise InputError("could not encode the image as PNG")
    return data.tobytes()


class RestClient:
    """TF Serving's REST API (``:predict`` on the ``serving_bytes`` signature).

    Args:
        url: ``http://HOST:8501`` (a trailing ``/`` is ignored).
        model: the model name; version: a version number or None (the server's choice).
        timeout: seconds per request.
    """

    def __init__(self, url: str, model: str = "focasnet", version=None, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--rest must be an http:// or https:// URL, got '{url}'")
        self.url, self.model, self.version, self.timeout = url.rstrip("/"), model, version, timeout
        self.endpoint = f"{self.url}/v1/models/{model}" + (
            "" if version is None else f"/versions/{int(version)}") + ":predict"

    def request_body(self, image: np.ndarray) -> dict:
        """The JSON body for one image (row format, base64 PNG)."""
        encoded = base64.b64encode(_encode_png(image)).decode("ascii")
        return {"signature_name": BYTES_SIGNATURE, "instances": [{BYTES_KEY: {"b64": encoded}}]}

    def predict(self, image: np.ndarray) -> dict:
        """One uint8 RGB image -> ``{output key: numpy array with a batch axis of 1}``."""
        data = json.dumps(self.request_body(image)).encode("utf-8")
        request = urllib.request.Request(self.endpoint, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise InputError(f"server answered {err.code}: {_error_text(err)}",
                             self.endpoint) from None
        except urllib.error.URLError as err:
            raise InputError(f"cannot reach the server ({err.reason})", self.url) from None
        except (OSError, ValueError) as err:
            raise InputError(f"no valid answer from the server ({err})", self.endpoint) from None
        return parse_rest_answer(answer, self.endpoint)

    def describe(self) -> dict:
        return {"transport": "rest", "url": self.url, "endpoint": self.endpoint,
                "signature": BYTES_SIGNATURE}


def _error_text(err) -> str:
    try:
        body = err.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        return str(json.loads(body)["error"]).splitlines()[0]
    except (ValueError, KeyError, TypeError, IndexError):
        return (body.strip().splitlines() or [str(err.reason)])[0]


def parse_rest_answer(answer, where="the server") -> dict:
    """TF Serving's REST answer (row ``predictions`` or columnar ``outputs``) for one image."""
    if isinstance(answer, dict) and "error" in answer:
        raise InputError(f"server error: {answer['error']}", where)
    if isinstance(answer, dict) and isinstance(answer.get("predictions"), list) \
            and len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], dict):
        row = answer["predictions"][0]
        outputs = {key: np.asarray(row[key])[None] for key in CASCADE_OUTPUTS if key in row}
    elif isinstance(answer, dict) and isinstance(answer.get("outputs"), dict):
        outputs = {key: np.asarray(value) for key, value in answer["outputs"].items()}
    else:
        raise InputError("the server's answer has no 'predictions' for one image", where)
    missing = [key for key in CASCADE_OUTPUTS if key not in outputs]
    if missing:
        raise InputError(f"the server's answer lacks {', '.join(missing)} (is this a "
                         "focas-keras cascade export?)", where)
    return outputs


class GrpcClient:
    """TF Serving's gRPC ``PredictionService.Predict`` on ``serving_default`` (uint8 pixels).

    Args:
        target: ``HOST:PORT`` (8500 by default on the server).
        model, version, timeout: as for :class:`RestClient`.
    """

    def __init__(self, target: str, model: str = "focasnet", version=None,
                 timeout: float = 60.0):
        try:
            import grpc
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        except ImportError:
            raise InputError(SERVE_EXTRA_HINT) from None
        if ":" not in target or target.startswith(("http://", "https://")):
            raise InputError(f"--server must be HOST:PORT (e.g. localhost:8500), got '{target}'")
        self.target, self.model, self.version, self.timeout = target, model, version, timeout
        self._grpc, self._predict_pb2 = grpc, predict_pb2
        # A whole HPF is ~13 MB of pixels: lift gRPC's 4 MB default (the server takes 2 GB).
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.answered_version = None

    def request(self, image: np.ndarray):
        """The ``PredictRequest`` for one image."""
        import tensorflow as tf

        request = self._predict_pb2.PredictRequest()
        request.model_spec.name = self.model
        request.model_spec.signature_name = DEFAULT_SIGNATURE
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        request.inputs[IMAGES_KEY].CopyFrom(
            tf.make_tensor_proto(np.ascontiguousarray(image[None], np.uint8)))
        return request

    def predict(self, image: np.ndarray) -> dict:
        import tensorflow as tf

        try:
            response = self._stub.Predict(self.request(image), timeout=self.timeout)
        except self._grpc.RpcError as err:
            code = err.code().name if hasattr(err, "code") else "ERROR"
            details = ((err.details() if hasattr(err, "details") else str(err)) or "").strip()
            first = details.splitlines()[0] if details else "no details"
            raise InputError(f"server answered {code}: {first}", self.target) from None
        if response.model_spec.HasField("version"):
            self.answered_version = int(response.model_spec.version.value)
        missing = [key for key in CASCADE_OUTPUTS if key not in response.outputs]
        if missing:
            raise InputError(f"the server's answer lacks {', '.join(missing)} (is this a "
                             "focas-keras cascade export?)", self.target)
        return {key: tf.make_ndarray(response.outputs[key]) for key in CASCADE_OUTPUTS}

    def describe(self) -> dict:
        return {"transport": "grpc", "target": self.target, "signature": DEFAULT_SIGNATURE,
                "answered_version": self.answered_version}

    def close(self):
        self._channel.close()


def make_client(server=None, rest=None, model="focasnet", version=None, timeout=60.0):
    """A :class:`GrpcClient` (``server``) or :class:`RestClient` (``rest``); exactly one."""
    if bool(server) == bool(rest):
        raise InputError("give exactly one of --server HOST:8500 (gRPC) and "
                         "--rest http://HOST:8501 (REST)")
    if server:
        return GrpcClient(server, model, version, timeout)
    return RestClient(rest, model, version, timeout)


def predict_to_dir(client, inputs, out_dir, mpp: float = 0.2456, overlays: bool = True,
                   progress: bool = True, overwrite: bool = False):
    """Sends every image to the server and writes what ``detect`` writes, plus predict.json.

    Args:
        client: a :class:`GrpcClient` or :class:`RestClient` (anything with ``predict(image)``
            returning the cascade outputs for one image, and ``describe()``).
        inputs: image files and/or directories (as for ``detect``).
        out_dir: output directory (assembled aside, renamed into place when complete).
        mpp: pixel size of the images, for ``counts.csv``'s densities.
        overlays, progress, overwrite: as for ``detect``.

    Returns:
        The counts table.
    """
    from tqdm import tqdm

    from focas_keras.datasets.annotations import load_image
    from focas_keras import __version__
    from focas_keras.export.savedmodel import outputs_to_tables
    from focas_keras.inference import outputs as writers
    from focas_keras.inference.cascade import list_inputs
    from focas_keras.io import atomic_output_dir, write_json_atomic

    files = list_inputs(inputs)
    if not mpp > 0:
        raise InputError(f"mpp must be > 0, got {mpp!r}")
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        frames, rows = {}, []
        for path in tqdm(files, desc="predict", unit="image", disable=not progress):
            image = load_image(path)
            try:
                df = outputs_to_tables(client.predict(image))[0]
            except InputError as err:
                raise InputError(f"{path.name}: {err}") from None
            frames[path.stem] = df
            rows.append(writers.count_row(path.stem, df, image.shape[1], image.shape[0], mpp))
            if overlays:
                writers.write_overlay(image, df, tmp / "overlays" / f"{path.stem}.jpg")
        counts = writers._write_tables(tmp, frames, rows)
        write_json_atomic(tmp / "predict.json", {
            "package_version": __version__, "server": client.describe(),
            "model": client.model, "version": client.version, "mpp": float(mpp),
            "images": {path.stem: str(Path(path)) for path in files},
            "totals": {"images": len(files), "candidates": int(counts.candidates.sum()),
                       "accepted": int(counts.accepted.sum())},
        })
    return counts
