"""qcalib: post-training quantization where calibration is the lever.

The few names most users need::

    from qcalib import RunConfig, QuantConfig, CalibConfig, quantize
    qmodel, result = quantize(RunConfig(quant=QuantConfig(wbits=4, abits=4)))

Layers import downward only: ``quant`` (tensor math) -> ``model`` (wrapping) ->
``calibrate`` / ``select`` -> ``pipeline`` / ``cli``; ``data`` and ``zoo`` sit beside.
"""

from qcalib.errors import QCalibError

__version__ = "0.1.0"

_LAZY = {
    "RunConfig": "qcalib.config",
    "QuantConfig": "qcalib.config",
    "CalibConfig": "qcalib.config",
    "SelectConfig": "qcalib.config",
    "ReconConfig": "qcalib.config",
    "ContrastiveConfig": "qcalib.config",
    "quantize": "qcalib.pipeline",
    "Workbench": "qcalib.pipeline",
    "load_run": "qcalib.artifact",
    "quantize_model": "qcalib.model.wrap",
    "CALIBRATORS": "qcalib.calibrate",
    "SELECTORS": "qcalib.select",
    "export_onnx": "qcalib.export",
    "export_run": "qcalib.export",
}


def __getattr__(name: str):  # noqa: ANN202
    # Lazy so that `import qcalib.quant` does not pull in the whole pipeline.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcalib' has no attribute {name!r}")


__all__ = ["QCalibError", "__version__", *_LAZY]
