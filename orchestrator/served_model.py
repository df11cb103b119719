"""The student a server holds: which registered version a model reference names now, that version
loaded through its pyfunc (as ``generate`` loads it), and requests sampled together.

A reference is anything ``generate`` takes. ``models:/NAME@ALIAS`` is followed: ``resolve`` names
the version the alias points at today, and a server calls it again to notice a promotion. Other
references (``models:/NAME/VERSION``, a run) name one model for good.

``ServedStudent.sample`` computes a batch of requests in one network call per step, each request
with its own noise drawn exactly as the pyfunc draws it (one generator seeded with the request's
seed, prompts in chunks of the pyfunc's batch size), so a request computed alone gives the bytes
``generate`` and the pyfunc give. Computed in a batch with others, its noise is the same but the
batched matmuls and the text encoder's padding round differently in the last bits of a float, so
a pixel can, rarely, land one level off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.generate import model_uri
from orchestrator.pyfunc import DEFAULT_PARAMS
from orchestrator.registry import alias_version, is_missing
from orchestrator.serve_request import GenerateRequest

ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class NoSuchModel(LookupError):
    """The reference names nothing to serve: an unknown model, or an alias that points nowhere."""


@dataclass(frozen=True)
class ModelRef:
    """A model reference as ``generate`` takes it, split into registry name and alias where it has them."""

    uri: str  # normalised: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., models:/<model id>
    name: str | None = None
    alias: str | None = None  # set: the reference follows this alias
    version: str | None = None  # set: a fixed registered version

    @classmethod
    def parse(cls, model: str, client: MlflowClient | None = None) -> ModelRef:
        uri = model_uri(model, client)
        if m := ALIAS_URI.match(uri):
            return cls(uri, m["name"], alias=m["alias"])
        if m := VERSION_URI.match(uri):
            return cls(uri, m["name"], version=m["version"])
        return cls(uri)


def resolve(ref: ModelRef, client: MlflowClient) -> str | None:
    """The registered version ``ref`` names now (``None`` for a run's model); ``NoSuchModel`` if none."""
    if ref.name is None:
        return None
    try:
        model = client.get_registered_model(ref.name)
    except MlflowException as err:
        if is_missing(err):
            raise NoSuchModel(f"{ref.uri}: no registered model named {ref.name!r}") from None
        raise
    if ref.version is not None:
        return ref.version
    version = alias_version(client, ref.name, ref.alias)  # an int or a str, by MLflow version
    if version is None:
        known = ", ".join(f"{a}=v{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise NoSuchModel(
            f"{ref.uri}: the alias {ref.alias!r} of registered model {ref.name!r} points to no version "
            f"(its aliases: {known})"
        )
    return str(version)


@dataclass
class ServedStudent:
    """One loaded version of the student, with what ``GET /model`` reports about it."""

    student: torch.nn.Module
    parts: torch.nn.Module  # the frozen teacher parts the student samples with (encoders, VAE)
    uri: str  # the exact model loaded (models:/NAME/VERSION for a registered one)
    version: str | None
    teacher: str | None  # the teacher it was distilled from (the training run's teacher.source)
    timesteps: list[int] = field(default_factory=list)

    @property
    def max_steps(self) -> int:
        return len(self.timesteps)

    def sample(self, requests: Sequence[GenerateRequest]) -> list[list[bytes]]:
        """PNG bytes per prompt of each request: one network call per step for all requests of the same steps."""
        from workers.eval.images import png_bytes, student_images, to_uint8

        out: list[list[bytes]] = [[] for _ in requests]
        for steps in sorted({r.steps for r in requests}):
            group = [i for i, r in enumerate(requests) if r.steps == steps]
            prompts = [p for i in group for p in requests[i].prompts]
            draws = [self.noise(requests[i]) for i in group]
            noise = [torch.cat([d[k] for d in draws]) for k in range(steps)]
            pixels = to_uint8(student_images(self.student, self.parts, prompts, steps, noise=noise))
            start = 0
            for i in group:
                n = len(requests[i].prompts)
                out[i] = [png_bytes(p) for p in pixels[start : start + n]]
                start += n
        return out

    def noise(self, request: GenerateRequest) -> list[torch.Tensor]:
        """The request's noise per step, drawn in the pyfunc's order: its seed, its chunks of prompts."""
        from workers.add.sampler import student_noise
        from workers.eval.images import model_shape

        generator = torch.Generator().manual_seed(request.seed)
        size, n = int(DEFAULT_PARAMS["batch_size"]), len(request.prompts)
        chunks = [student_noise(model_shape(self.parts, min(size, n - i)), request.steps, generator)
                  for i in range(0, n, size)]  # fmt: skip
        return [torch.cat([c[k] for c in chunks]) for k in range(request.steps)]


def load(ref: ModelRef, version: str | None, client: MlflowClient, device: str = "cpu") -> ServedStudent:
    """Load ``version`` of ``ref`` (or the run's model) through its pyfunc, as ``generate`` does."""
    import mlflow

    from orchestrator.pyfunc import fluent_context

    uri = f"models:/{ref.name}/{version}" if version is not None else ref.uri
    with fluent_context(client.tracking_uri, None):  # the loader reads MLflow's process-wide URIs
        pyfunc = mlflow.pyfunc.load_model(uri)
    model = pyfunc.unwrap_python_model()  # the StudentModel, its load_context already run
    student, parts = model.student.to(device), model.parts.to(device)
    return ServedStudent(student, parts, uri, version, _teacher(ref, version, client), student.timesteps.tolist())


def _teacher(ref: ModelRef, version: str | None, client: MlflowClient) -> str | None:
    """The teacher the version's training run names (its resolved job is logged as params)."""
    try:
        run_id = client.get_model_version(ref.name, version).run_id if version is not None else None
        return client.get_run(run_id).data.params.get("teacher.source") if run_id else None
    except MlflowException:
        return None
