"""``generate``: prompts in, a PNG grid out, from a registered student or a run's logged one.

What ``addctl generate`` calls. ``model`` is ``models:/NAME@ALIAS`` (``NAME@ALIAS`` works too),
``models:/NAME/VERSION``, ``runs:/RUN_ID/student``, ``models:/<model id>``, or a bare run id (the
pyfunc model that run logged).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def model_uri(model: str, client=None) -> str:
    """The MLflow model URI ``model`` stands for (see the module docstring)."""
    if model.startswith(("models:/", "runs:/")):
        return model
    if RUN_ID.match(model):
        from mlflow.tracking import MlflowClient

        client = client or MlflowClient()
        run = client.get_run(model)
        logged = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{model}'", max_results=10
        )
        if not logged:
            raise ValueError(f"run {model} logged no model")
        return f"models:/{logged[0].model_id}"
    if "@" in model or re.match(r"^[^/]+/\d+$", model):
        return f"models:/{model}"
    raise ValueError(f"{model!r} is not a model: give models:/NAME@ALIAS, models:/NAME/VERSION or a run id")


def generate(
    model: str,
    prompts: list[str],
    out: str | Path,
    *,
    steps: int = 1,
    seed: int = 0,
    columns: int | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Sample one image per prompt with the student ``model`` and write them as a PNG grid at ``out``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from workers.eval.images import image_grid

    if not prompts:
        raise ValueError("give at least one prompt")
    from orchestrator.pyfunc import fluent_context

    with fluent_context(tracking_uri or None, None):  # models:/ resolves here; the process's URIs come back after
        uri = model_uri(model, MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
        pyfunc = mlflow.pyfunc.load_model(uri)
    frame = pyfunc.predict(
        pd.DataFrame({"prompt": [str(p) for p in prompts]}), params={"num_inference_steps": steps, "seed": seed}
    )
    images = np.stack([_array(png) for png in frame["image"]])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns=columns).save(out, format="PNG")
    return out


def _array(png: bytes) -> np.ndarray:
    array = np.asarray(Image.open(io.BytesIO(png)))
    return array[..., None] if array.ndim == 2 else array
