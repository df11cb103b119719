"""The student as an MLflow model: a pyfunc that loads the exported diffusers folder, prompts in, images out.

Input: a DataFrame with a ``prompt`` column (captions, or class labels as strings for
class-conditioned students). Params: ``num_inference_steps`` (1..N student steps, default 1),
``seed`` (default 0), ``batch_size``. Output: a DataFrame with ``prompt`` and ``image`` (PNG bytes),
one row per prompt. The folder is the one ``workers.add.export.export_student`` wrote, logged
whole as the model's ``student`` artifact, so ``DiffusionPipeline.from_pretrained`` also loads it
for SD, SDXL, SD3, FLUX and Sana students. Loading needs this project's packages (``workers``,
``orchestrator``) importable, as in the Ray image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient, fluent

ARTIFACT = "student"  # the key of the exported folder among the model's artifacts
DEFAULT_PARAMS = {"num_inference_steps": 1, "seed": 0, "batch_size": 16}
# What serving the model needs; the project itself must also be importable (see the module docstring).
PIP_REQUIREMENTS = [
    f"mlflow=={mlflow.__version__}",
    f"torch=={torch.__version__.split('+')[0]}",
    "diffusers>=0.35,<0.43",
    "transformers>=4.50,<6",
    "peft>=0.17,<0.22",
    "safetensors>=0.4",
    "pandas",
    "pillow>=10",
]


class StudentModel(mlflow.pyfunc.PythonModel):
    """Prompts to one-step (or few-step) images with the exported student."""

    def load_context(self, context) -> None:
        from workers.add.export import load_student

        self.student, self.parts = load_student(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """One PNG per prompt; the same prompts, params and seed give the same images."""
        from workers.eval.images import png_bytes, student_images, to_uint8

        params = {**DEFAULT_PARAMS, **(params or {})}
        prompts = _prompts(model_input)
        generator = torch.Generator().manual_seed(int(params["seed"]))
        steps, size = int(params["num_inference_steps"]), max(1, int(params["batch_size"]))
        images = [
            student_images(self.student, self.parts, prompts[i : i + size], steps, generator)
            for i in range(0, len(prompts), size)
        ]
        pixels = to_uint8(torch.cat(images)) if images else np.zeros((0, 1, 1, 1), np.uint8)
        return pd.DataFrame({"prompt": prompts, "image": [png_bytes(p) for p in pixels]})


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"the input needs a 'prompt' column, got columns {list(model_input.columns)}")
        return [str(p) for p in model_input["prompt"]]
    if isinstance(model_input, dict) and "prompt" in model_input:
        values = model_input["prompt"]
        return [str(p) for p in (values if isinstance(values, list | tuple | np.ndarray) else [values])]
    if isinstance(model_input, list | tuple | np.ndarray):
        return [str(p) for p in model_input]
    if isinstance(model_input, str):
        return [model_input]
    raise ValueError(f"prompts: a DataFrame with a 'prompt' column or a list of strings, got {type(model_input)}")


def student_signature(example_prompts: list[str]) -> tuple[ModelSignature, pd.DataFrame]:
    """The signature (prompt: string -> prompt: string, image: binary; params with defaults) and the input example."""
    example = pd.DataFrame({"prompt": [str(p) for p in example_prompts]})
    output = pd.DataFrame({"prompt": example["prompt"], "image": [b"\x89PNG"] * len(example)})
    return infer_signature(example, output, params=DEFAULT_PARAMS), example


@contextmanager
def fluent_context(tracking_uri: str | None, experiment_id: str | None) -> Iterator[None]:
    """MLflow's process-wide tracking URI and experiment set inside, restored exactly after (unset
    stays unset): ``Model.log`` reads them, and logs the model to the fluent experiment, not its run's."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id)
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    if experiment_id is not None:
        fluent._active_experiment_id = experiment_id
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_student_model(
    run_id: str,
    export_dir: str,
    example_prompts: list[str],
    name: str = "student",
    tags: dict | None = None,
    tracking_uri: str | None = None,
) -> ModelInfo:
    """Log the exported folder as a pyfunc model of run ``run_id`` (no active run needed); returns its ModelInfo."""
    signature, example = student_signature(example_prompts[:2] or ["0"])
    experiment_id = MlflowClient(tracking_uri, tracking_uri).get_run(run_id).info.experiment_id
    with fluent_context(tracking_uri, experiment_id):
        return _log(run_id, export_dir, name, signature, example, tags)


def _log(run_id, export_dir, name, signature, example, tags) -> ModelInfo:
    return Model.log(
        None,  # artifact_path: superseded by name
        name=name,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=StudentModel(),
        artifacts={ARTIFACT: str(export_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=PIP_REQUIREMENTS,  # given, so MLflow does not import the model in a subprocess to infer them
        tags=tags,
    )
