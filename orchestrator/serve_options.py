"""What a served student application is asked to be: ``addctl serve``'s options, a Serve config's ``args``.

Kept apart from ``orchestrator.serve`` so the CLI reads its defaults and help without importing
Ray Serve.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeOptions(BaseModel):
    """The application's arguments: ``addctl serve``'s options, or a Serve config's ``args``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="models:/NAME@ALIAS (followed), models:/NAME/VERSION, a run id, ...")
    tracking_uri: str | None = Field(None, description="MLflow the replicas read (default: MLFLOW_TRACKING_URI)")
    replicas: int = Field(1, ge=1, description="replicas of the student")
    num_cpus: float = Field(1.0, gt=0, description="CPUs each replica reserves (its torch threads on CPU)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves (> 0: the student runs on CUDA)")
    batching: bool = Field(True, description="batch concurrent requests into one network call (@serve.batch)")
    max_batch_size: int = Field(16, ge=1, description="images per network call; also prompts per request")
    batch_wait_s: float = Field(
        0.0, ge=0, description="wait of an idle replica for a batch to fill (a busy one batches what arrives meanwhile)"
    )
    poll_s: float = Field(10.0, gt=0, description="seconds between a replica's checks of the alias")
    max_prompt_chars: int = Field(500, ge=1, description="characters per prompt")
