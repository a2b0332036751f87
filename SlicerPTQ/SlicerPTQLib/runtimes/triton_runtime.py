"""A model on a Triton Inference Server as a runtime (KServe v2 over HTTP).

Preprocessing and sliding-window blending stay on the client; each
``predict`` sends one batch of patches to the server with the binary
tensor extension (raw float32 after the JSON header) and reads the
output the same way.

The client is the standard library's ``http.client``, not
``tritonclient``: tritonclient's HTTP client needs gevent, and its gRPC
client pins a protobuf the project's ONNX tooling cannot share, while the
v2 HTTP protocol is a few lines of JSON. One connection per runtime, kept
alive; a runtime is for one thread (a cohort gives each worker its own).

Inference is idempotent (same patches, same output), so a request that
fails on the way (connection refused or reset, timeout, HTTP 5xx) is sent
again, up to ``retries`` times with a growing pause; a request the server
rejects (HTTP 4xx) is not.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import PTQError
from ..spec import ModelSpec
from .base import Runtime

SPEC_PARAMETER = "slicer_ptq_spec"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 3
_RETRY_PAUSE_S = 0.5


class TritonRuntime(Runtime):
    """Model ``model`` on the Triton server at ``url`` (``http://host:port``).

    Checks on creation that the server answers, the model is ready and
    takes 5-D float32 patches; :meth:`spec` is the model's preprocessing
    and labels as exported (``slicer-ptq export-triton``).
    """

    name = "triton"
    precision = "remote"

    def __init__(self, url: str, model: str, timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES):
        self.url, self.host, self.port = parse_url(url)
        if timeout <= 0 or retries < 0:
            raise PTQError(f"The server timeout must be positive and the retries not negative "
                           f"(got {timeout} s and {retries}).")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self._connection: Optional[http.client.HTTPConnection] = None
        self._path = f"/v2/models/{urllib.parse.quote(model, safe='')}"
        status, body = self._request("GET", "/v2/health/live")
        if status != 200:
            raise PTQError(f"The Triton server at {self.url} is not live (HTTP {status}). Check the server's log.")
        status, body = self._request("GET", self._path)
        if status != 200 or not self._ready():
            raise PTQError(f"The Triton server at {self.url} has no model '{model}' ready "
                           f"({_server_error(body) or f'HTTP {status}'}). Models there: "
                           f"{', '.join(self.models()) or 'none'}. Give one of them, or export and load it "
                           "(slicer-ptq export-triton).")
        metadata = json.loads(body)
        if len(metadata.get("inputs", [])) != 1 or len(metadata.get("outputs", [])) != 1:
            raise PTQError(f"Model '{model}' on {self.url} has {len(metadata.get('inputs', []))} inputs and "
                           f"{len(metadata.get('outputs', []))} outputs; segmentation takes one of each.")
        self.input = metadata["inputs"][0]
        self.output = metadata["outputs"][0]
        if self.input.get("datatype") != "FP32" or len(self.input.get("shape", [])) != 5:
            raise PTQError(f"Model '{model}' on {self.url} takes {self.input.get('datatype')} "
                           f"{self.input.get('shape')}; segmentation sends FP32 patches (B, C, D, H, W).")
        status, body = self._request("GET", self._path + "/config")
        self.config = json.loads(body) if status == 200 else {}
        self.max_batch = int(self.config.get("max_batch_size", 0)) or 1

    def spec(self) -> ModelSpec:
        """The model's spec from its server config (parameter ``slicer_ptq_spec``)."""
        text = self.config.get("parameters", {}).get(SPEC_PARAMETER, {}).get("string_value")
        if not text:
            raise PTQError(f"Model '{self.model}' on {self.url} carries no SlicerPTQ metadata "
                           f"({SPEC_PARAMETER} in its config.pbtxt). Export it with slicer-ptq export-triton.")
        try:
            return ModelSpec.from_dict(json.loads(text))
        except (ValueError, TypeError) as exc:
            raise PTQError(f"Model '{self.model}' on {self.url} has unreadable metadata: {exc}. "
                           "Export it again with slicer-ptq export-triton.") from exc

    def models(self) -> List[str]:
        """Names of the models the server's repository lists."""
        try:
            status, body = self._request("POST", "/v2/repository/index", b"{}")
        except PTQError:
            return []
        return sorted(entry.get("name", "") for entry in json.loads(body)) if status == 200 else []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C, D, H, W)`` float32 -> the server's output, in chunks of its max batch."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = self.input["shape"][1:]
        if batch.ndim != 5 or any(want not in (-1, got) for want, got in zip(expected, batch.shape[1:])):
            raise PTQError(f"Model '{self.model}' on {self.url} takes patches {expected} (C, D, H, W), got "
                           f"{list(batch.shape[1:])}. Use the spec the model was exported with "
                           "(its roi_size), or export the build again.")
        chunks = [self._infer(batch[start:start + self.max_batch])
                  for start in range(0, batch.shape[0], self.max_batch)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        header = json.dumps({
            "inputs": [{"name": self.input["name"], "shape": list(batch.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": batch.nbytes}}],
            "outputs": [{"name": self.output["name"], "parameters": {"binary_data": True}}],
        }).encode()
        status, body, headers = self._request("POST", self._path + "/infer", header + batch.tobytes(),
                                              {"Inference-Header-Content-Length": str(len(header)),
                                               "Content-Type": "application/octet-stream"}, with_headers=True)
        if status != 200:
            raise PTQError(f"Model '{self.model}' on {self.url} refused the request: "
                           f"{_server_error(body) or f'HTTP {status}'}. Check the model's config and log.")
        size = int(headers.get("Inference-Header-Content-Length") or len(body))
        answer = json.loads(body[:size])
        output = answer["outputs"][0]
        if output.get("datatype") != "FP32":
            raise PTQError(f"Model '{self.model}' on {self.url} answered {output.get('datatype')}; "
                           "segmentation needs FP32 outputs.")
        data = np.frombuffer(body[size:], dtype=np.float32) if size < len(body) \
            else np.asarray(output["data"], dtype=np.float32)
        return data.reshape(output["shape"])

    def _request(self, method: str, path: str, body: Optional[bytes] = None,
                 headers: Optional[Dict[str, str]] = None, with_headers: bool = False):
        """Send with retries of transport failures and HTTP 5xx; PTQError when every try fails."""
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(_RETRY_PAUSE_S * 2 ** (attempt - 1))
            try:
                connection = self._connect()
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                data = response.read()
                if response.status >= 500:
                    problem = f"HTTP {response.status}: {_server_error(data)}"
                    self.close()
                    continue
                result = (response.status, data)
                return result + (dict(response.headers),) if with_headers else result
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, closed
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.close()
        advice = ("or raise --server-timeout" if "timed out" in problem.lower() or "Timeout" in problem
                  else "and that it listens on that port")
        raise PTQError(f"The Triton server at {self.url} did not answer {method} {path} after "
                       f"{self.retries + 1} tries ({problem}). Check that the server runs and the URL, "
                       f"{advice}.")

    def _ready(self) -> bool:
        status, _ = self._request("GET", self._path + "/ready")
        return status == 200

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._connection.connect()
            # Requests are a header and one body write: without Nagle's delay they leave at once.
            self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def parse_url(url: str) -> Tuple[str, str, int]:
    """``http://host:port`` -> ``(normalised url, host, port)``; PTQError for other schemes."""
    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme == "grpc":
        raise PTQError(f"--server {url}: gRPC needs tritonclient's gRPC client, which this installation "
                       "does not use. Give the server's HTTP endpoint instead, e.g. http://host:8000.")
    if parsed.scheme != "http" or not parsed.hostname:
        raise PTQError(f"--server {url} is not an HTTP address. Give the Triton server's HTTP endpoint, "
                       "e.g. http://127.0.0.1:8000.")
    try:
        port = parsed.port or 8000
    except ValueError as exc:
        raise PTQError(f"--server {url} has a bad port ({exc}). Give e.g. http://127.0.0.1:8000.") from exc
    return f"http://{parsed.hostname}:{port}", parsed.hostname, port


def _server_error(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")
