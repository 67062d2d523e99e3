"""The ONNX Runtime side of the neural bundle kind, beside :mod:`.neural_torch`: runs the
``model.onnx`` that ``hematoscope export`` writes into a bundle, without importing torch."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hematoscope.bundle.base import BundleError

#: The exported graph inside a neural bundle (inputs ``images``, outputs ``logits``, ``features``).
ONNX_FILE = "model.onnx"


def physical_cores() -> int:
    """CPU cores this process may use, not counting hyper-threads (ONNX Runtime runs best with
    one thread per physical core)."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = physical
    return max(1, min(physical, allowed))


class OnnxRunner:
    """An ONNX Runtime session for a hematoscope model, created once and reused.

    Thread-safe: several threads (e.g. web requests) may call :meth:`run` at once.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: the physical cores this process may use).
    """

    #: Images per ONNX Runtime call: larger batches are run in chunks of this many. On the 2-core
    #: machine a Lite0 at 128 px ran 1.8 ms/image in chunks of 8 against 2.7 at 64 (bench/predict_speed.py).
    CHUNK = 8

    def __init__(self, path: Path | str, threads: int | None = None, chunk: int | None = None):
        import onnxruntime as ort

        self.chunk = chunk or self.CHUNK

        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"no ONNX model at {self.path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads would steal the CPU from the image decoders between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Float32 NCHW batch → (logits (N, C), features (N, D) or None when the graph has none),
        computed ``chunk`` images at a time."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [self.session.run(None, {self.input_name: x[i:i + self.chunk]})
                 for i in range(0, max(len(x), 1), self.chunk)]
        if len(parts) == 1:
            outputs = parts[0]
        else:
            outputs = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)
