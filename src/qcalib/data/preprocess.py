"""Named input preprocessing of image files, and which one a model expects.

A pretrained network is only right on inputs normalized the way it was trained, and the
calibration pool must be preprocessed exactly like the evaluation data (activation ranges
are calibrated on it). Presets (:data:`PREPROCESSING`):

* ``imagenet``: torchvision's evaluation preset, resize the shorter side to 256 (bilinear),
  center-crop 224, ``(x / 255 - mean) / std`` with the ImageNet mean / std.
* ``efficientnet-lite``: the TF EfficientNet-Lite convention, ``(x - 127) / 128`` on 0-255
  RGB (written as mean 127/255, std 128/255 on ``x / 255``). Resize 256 / crop 224: TF's
  eval crop takes the central 224/(224+32) of the image and resizes it to 224 bicubic; we
  resize first then crop, with bilinear resampling, the same geometry up to interpolation
  (our choice, so both presets share one code path).

``auto`` (the default of ``RunConfig.preprocess``) picks the model's own: a model class
listed in :data:`MODEL_PREPROCESS` (matched on its MRO, so the user's own instance of the
package's class is recognized) or a model whose ``input_preprocess`` attribute names a
preset; else ``imagenet``. Only image-file datasets (``imagefolder:``, ``files:``) are
transformed; tensor datasets (Fashion-MNIST, digits) and text ignore it.
"""

from __future__ import annotations

from collections.abc import Callable

from qcalib.data.imagefolder import EvalTransform
from qcalib.errors import QCalibError
from qcalib.registry import Registry

AUTO = "auto"
PREPROCESSING: Registry[Callable[[], EvalTransform]] = Registry("preprocessing")

#: 0-255 RGB ``(x - 127) / 128`` written on ``x / 255``: mean 127/255, std 128/255.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3


@PREPROCESSING.register("imagenet")
def imagenet() -> EvalTransform:
    return EvalTransform()


@PREPROCESSING.register("efficientnet-lite")
def efficientnet_lite() -> EvalTransform:
    return EvalTransform(resize=256, crop=224, mean=TF_LITE_MEAN, std=TF_LITE_STD)


#: Model classes (``module.qualname``) and the preset they were trained with.
MODEL_PREPROCESS = {
    "efficientnet_lite_pytorch.model.EfficientNet": "efficientnet-lite",
}


def model_preprocess(model: object) -> str:
    """The preset ``model`` expects: its ``input_preprocess``, its class's, or imagenet."""
    declared = getattr(model, "input_preprocess", None)
    if isinstance(declared, str):
        return declared
    for cls in type(model).__mro__:
        name = MODEL_PREPROCESS.get(f"{cls.__module__}.{cls.__qualname__}")
        if name is not None:
            return name
    return "imagenet"


def check_preprocess(name: str) -> str:
    if name != AUTO and name not in PREPROCESSING:
        raise QCalibError(
            f"unknown --preprocess {name!r}; choose one of: "
            f"{', '.join([AUTO, *PREPROCESSING.names()])}"
        )
    return name


def image_transform(name: str, model: object = None) -> EvalTransform:
    """The transform of preset ``name`` (``auto``: :func:`model_preprocess` of ``model``)."""
    name = model_preprocess(model) if check_preprocess(name) == AUTO else name
    return PREPROCESSING.get(name)()
