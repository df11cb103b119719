"""Evaluation of a distilled student against its teacher: Fréchet distance in a pluggable feature
space, prompt alignment from a pluggable scorer, and speed, both measured in the same process.

Never used in training. ``Evaluator`` is the entry point; the feature extractor and the scorer are
injected (Inception and CLIP for SD-class jobs; a project-trained classifier for Fashion-MNIST).
"""

from workers.eval.alignment import CLIPScorer, PromptScorer
from workers.eval.evaluator import EvalConfig, EvalResult, Evaluator, ImageMetric, Samples
from workers.eval.features import FeatureExtractor, InceptionFeatures
from workers.eval.frechet import FeatureStats, frechet_distance
from workers.eval.images import image_grid, student_images, teacher_images, to_uint8
from workers.eval.speed import ms_per_image

__all__ = [
    "CLIPScorer",
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "FeatureExtractor",
    "FeatureStats",
    "ImageMetric",
    "InceptionFeatures",
    "PromptScorer",
    "Samples",
    "frechet_distance",
    "image_grid",
    "ms_per_image",
    "student_images",
    "teacher_images",
    "to_uint8",
]
