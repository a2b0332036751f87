"""A model on a Triton Inference Server as a runtime, through NVIDIA's ``tritonclient``.

Preprocessing and sliding-window blending stay on the client; each
``predict`` sends one batch of patches to the server over HTTP(S)
(``http://host:8000``) or gRPC (``grpc://host:8001``) and reads the
output. One client per runtime; a runtime is for one thread (a cohort
gives each worker its own).

Inference is idempotent (same patches, same output), so a request that
fails on the way (connection refused or reset, timeout, server error) is
sent again, up to ``retries`` times with a growing pause, on a new
connection; a request the server rejects (a bad request, an unknown
model) is not.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from ..errors import PTQError
from ..spec import ModelSpec
from .base import Runtime

SPEC_PARAMETER = "slicer_ptq_spec"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 3
_RETRY_PAUSE_S = 0.5
#: Default port per URL scheme (Triton's HTTP and gRPC ports; HTTPS is usually a proxy on 443).
DEFAULT_PORTS = {"http": 8000, "https": 443, "grpc": 8001}
INSTALL_HINT = "pip install 'tritonclient[grpc,http]' (or the slicer-ptq[triton] extra)"
#: gRPC status codes of a failure on the way, worth another try.
_GRPC_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")


class TritonRuntime(Runtime):
    """Model ``model`` on the Triton server at ``url`` (``http://``, ``https://`` or ``grpc://host:port``).

    Checks on creation that the server answers, the model is ready and
    takes 5-D float32 patches; :meth:`spec` is the model's preprocessing
    and labels as exported (``slicer-ptq export-triton``).
    """

    name = "triton"
    precision = "remote"

    def __init__(self, url: str, model: str, timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES):
        self.url, self.scheme, self.address = parse_url(url)
        if timeout <= 0 or retries < 0:
            raise PTQError(f"The server timeout must be positive and the retries not negative "
                           f"(got {timeout} s and {retries}).")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self._module = client_module(self.scheme)
        self._client: Any = None
        if not self._call("check that the server is live", lambda client: client.is_server_live(**self._timeout())):
            raise PTQError(f"The Triton server at {self.url} is not live. Check the server's log.")
        problem = self._model_problem()
        if problem:
            raise PTQError(f"The Triton server at {self.url} has no model '{model}' ready ({problem}). Models "
                           f"there: {', '.join(self.models()) or 'none'}. Give one of them, or export and load "
                           "it (slicer-ptq export-triton).")
        metadata = self._call("read the model's metadata", lambda client: client.get_model_metadata(
            model, **self._as_json()))
        inputs, outputs = metadata.get("inputs", []), metadata.get("outputs", [])
        if len(inputs) != 1 or len(outputs) != 1:
            raise PTQError(f"Model '{model}' on {self.url} has {len(inputs)} inputs and {len(outputs)} outputs; "
                           "segmentation takes one of each.")
        self.input_name, self.output_name = inputs[0]["name"], outputs[0]["name"]
        self.input_shape = [int(size) for size in inputs[0].get("shape", [])]  # gRPC's JSON gives strings
        if inputs[0].get("datatype") != "FP32" or len(self.input_shape) != 5:
            raise PTQError(f"Model '{model}' on {self.url} takes {inputs[0].get('datatype')} {self.input_shape}; "
                           "segmentation sends FP32 patches (B, C, D, H, W).")
        config = self._call("read the model's config", lambda client: client.get_model_config(
            model, **self._as_json()))
        self.config = config.get("config", config)  # gRPC wraps it in {"config": ...}
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
        """Names of the models the server's repository lists ([] when it cannot be read)."""
        try:
            index = self._call("list the models", lambda client: client.get_model_repository_index(
                **self._as_json()))
        except PTQError:
            return []
        entries = index.get("models", []) if isinstance(index, dict) else index  # gRPC: {"models": [...]}
        return sorted(entry.get("name", "") for entry in entries)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C, D, H, W)`` float32 -> the server's output, in chunks of its max batch."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = self.input_shape[1:]
        if batch.ndim != 5 or any(want not in (-1, got) for want, got in zip(expected, batch.shape[1:])):
            raise PTQError(f"Model '{self.model}' on {self.url} takes patches {expected} (C, D, H, W), got "
                           f"{list(batch.shape[1:])}. Use the spec the model was exported with "
                           "(its roi_size), or export the build again.")
        chunks = [self._infer(batch[start:start + self.max_batch])
                  for start in range(0, batch.shape[0], self.max_batch)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        patches = self._module.InferInput(self.input_name, list(batch.shape), "FP32")
        patches.set_data_from_numpy(batch)
        wanted = self._module.InferRequestedOutput(self.output_name)
        answer = self._call("run the model", lambda client: client.infer(
            self.model, [patches], outputs=[wanted], **self._timeout()))
        output = answer.as_numpy(self.output_name)
        if output is None or output.dtype != np.float32:
            raise PTQError(f"Model '{self.model}' on {self.url} answered "
                           f"{'nothing' if output is None else output.dtype}; segmentation needs FP32 outputs.")
        return output

    def _model_problem(self) -> str:
        """Why the model cannot serve ("" when it is ready)."""
        try:
            ready = self._call("check the model", lambda client: client.is_model_ready(self.model, **self._timeout()))
        except _Refused as exc:
            return exc.detail
        return "" if ready else "not loaded or not ready"

    def _timeout(self) -> dict:
        # HTTP's timeouts are set on the client; gRPC's on each call.
        return {"client_timeout": self.timeout} if self.scheme == "grpc" else {}

    def _as_json(self) -> dict:
        return {"as_json": True, **self._timeout()} if self.scheme == "grpc" else {}

    def _call(self, what: str, request: Callable[[Any], Any]):
        """``request(client)`` with retries of failures on the way; PTQError when it is refused or every try fails."""
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(_RETRY_PAUSE_S * 2 ** (attempt - 1))
            try:
                return request(self._connect())
            except self._module.InferenceServerException as exc:
                message = exc.message() or str(exc)
                status = str(exc.status() or "")
                if not _transient(status):
                    raise _Refused(f"The Triton server at {self.url} refused to {what} for model "
                                   f"'{self.model}': {message}. Check the model's config and the server's log.",
                                   message) from exc
                problem = f"{status.replace('StatusCode.', '')}: {message}".strip(": ")
            except (OSError, http.client.HTTPException) as exc:  # HTTP: refused, reset, timed out, closed early
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.close()  # a new connection for the next try
        timed_out = "timed out" in problem.lower() or "DEADLINE_EXCEEDED" in problem
        advice = "or raise --server-timeout" if timed_out else "and that it listens on that port"
        raise PTQError(f"The Triton server at {self.url} did not answer (to {what}) after {self.retries + 1} "
                       f"tries ({problem}). Check that the server runs and the URL, {advice}.")

    def _connect(self):
        if self._client is None:
            if self.scheme == "grpc":
                self._client = self._module.InferenceServerClient(self.address)
            else:
                self._client = self._module.InferenceServerClient(
                    self.address, ssl=self.scheme == "https", connection_timeout=self.timeout,
                    network_timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass


class _Refused(PTQError):
    """The server answered with a refusal; ``detail`` is its own message."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def _transient(status: str) -> bool:
    """A failure on the way (gRPC UNAVAILABLE & co., HTTP 5xx or no status), not a refusal."""
    if status.startswith("StatusCode."):
        return status[len("StatusCode."):] in _GRPC_TRANSIENT
    return not status.isdigit() or int(status) >= 500


def client_module(scheme: str):
    """``tritonclient.http`` or ``tritonclient.grpc``; PTQError naming the package when it is missing."""
    try:
        if scheme == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as exc:
        raise PTQError(f"A Triton server needs NVIDIA's Triton client, which cannot be imported here ({exc}). "
                       f"Install it: {INSTALL_HINT}.") from exc
    return module


def parse_url(url: str) -> Tuple[str, str, str]:
    """``http://host:port`` (or https, grpc; no scheme: http) -> ``(normalised url, scheme, "host:port")``."""
    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname or parsed.path not in ("", "/"):
        raise PTQError(f"--server {url} is not a Triton server address. Give its HTTP or gRPC endpoint, e.g. "
                       "http://127.0.0.1:8000 or grpc://127.0.0.1:8001.")
    try:
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    except ValueError as exc:
        raise PTQError(f"--server {url} has a bad port ({exc}). Give e.g. http://127.0.0.1:8000.") from exc
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host}:{port}", parsed.scheme, f"{host}:{port}"


def check_server_url(url: Optional[str]) -> str:
    """The normalised ``url``; PTQError for an empty or malformed one (checked before any worker starts)."""
    if not url:
        raise PTQError("The Triton runtime needs the server's URL, e.g. http://127.0.0.1:8000 or "
                       "grpc://127.0.0.1:8001.")
    return parse_url(url)[0]
