"""Triton Python-backend model: the project's OpenVINO runtime behind a Triton server.

:mod:`.triton_export` copies this file as ``<model>/1/model.py``. The
server's Python backend stub runs it with the Python the stub was started
with; ``config.pbtxt`` names the network file (``model_file``, beside this
file) and where SlicerPTQLib lives (``slicer_ptq_path``, optional).

Tensors cross the stub through DLPack, not ``as_numpy()``/``Tensor(name,
array)``: the stub's numpy bindings were built for numpy 1 and read
numpy 2 arrays wrongly. Outputs go out as torch DLPack capsules because
the stub renames the capsule it consumes, which numpy's capsule destructor
does not expect (it logs an error per call); torch's handles it.
"""

import json
import sys
from pathlib import Path


class TritonPythonModel:
    """One OpenVINO runtime per model instance; every patch runs alone.

    Patches of a batch (or of requests the dynamic batcher merged) run
    one at a time, so a patch's output never depends on what it was
    batched with and remote labels equal a local run's exactly.
    """

    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        library = parameters.get("slicer_ptq_path", "")
        if library and library not in sys.path:
            sys.path.insert(0, library)
        from SlicerPTQLib.runtimes.openvino_runtime import OpenVINORuntime

        folder = Path(args["model_repository"]) / args["model_version"]
        threads = int(parameters["threads"]) if parameters.get("threads") else None
        self.runtime = OpenVINORuntime(folder / parameters["model_file"],
                                       precision=parameters.get("precision") or None, threads=threads)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        import numpy as np
        import torch
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                batch = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input_name))
                output = np.concatenate([self.runtime.predict(batch[index:index + 1])
                                         for index in range(batch.shape[0])])
                tensor = pb_utils.Tensor.from_dlpack(
                    self.output_name, torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(output))))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            except Exception as exc:  # one bad request answers with its error; the others still run
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self):
        self.runtime.close()
