"""Evaluation of a distilled student against its teacher: Fréchet distance in a pluggable feature
space, prompt alignment from a pluggable scorer, and speed, both measured in the same process.

Never used in training. ``Evaluator`` is the entry point; the feature extractor and the scorer are
injected (Inception and CLIP for SD-class jobs; a project-trained classifier for Fashion-MNIST).
Its configuration is the job file's ``eval`` section, ``workers.eval.config.EvalSpec``.

The names below are imported on first use (PEP 562): the job spec imports ``workers.eval.config``
and must not load torch with it.
"""

import importlib

_EXPORTS = {
    "CLIPScorer": "alignment",
    "PromptScorer": "alignment",
    "EvalSpec": "config",
    "EvalResult": "evaluator",
    "Evaluator": "evaluator",
    "ImageMetric": "evaluator",
    "Samples": "evaluator",
    "FeatureExtractor": "features",
    "InceptionFeatures": "features",
    "FeatureStats": "frechet",
    "frechet_distance": "frechet",
    "image_grid": "images",
    "student_images": "images",
    "teacher_images": "images",
    "to_uint8": "images",
    "ms_per_image": "speed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
