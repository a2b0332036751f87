"""SlicerPTQ core: post-training quantization of 3D segmentation networks.

Pure Python (no qt, ctk or slicer.app), so it runs inside 3D Slicer's
worker processes, from the ``slicer-ptq`` command line and under pytest.
The stages, one module each: ``models`` (load) -> ``volumes`` and
``preprocess`` (IO, to the network grid and back) -> ``calibration`` and
``observers`` (statistics, scales) -> ``export`` and ``qdq`` (FP32 ONNX,
Q/DQ insertion) -> ``runtimes`` (one ``predict`` face per backend) ->
``inference`` (sliding window) -> ``metrics``; ``pipeline`` ties them
together and ``cli`` drives it.
"""

__version__ = "0.1.0"
