"""A ``POST /generate`` body, checked: what a served request may ask for, and a one-line reason when not.

The body is a JSON object: ``prompts`` (a list of strings) or ``prompt`` (one string), ``steps``
(1..N of the student, default 1), ``seed`` (default 0) and ``format`` (``png``: the image itself,
one prompt only; ``json``: base64 PNGs, the default for several prompts). Every check the server
makes on a request lives here, so a bad request is answered before it reaches the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

FIELDS = ("prompts", "prompt", "steps", "seed", "format")
FORMATS = ("png", "json")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any int64; negatives are refused to keep seeds simple


class BadRequest(ValueError):
    """A request the server refuses (HTTP 4xx); ``str()`` is the one-line reason, ``status`` the code."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the served student."""

    max_steps: int  # N, the student's number of timesteps
    max_prompts: int  # prompts per request (the server's --max-batch-size)
    max_prompt_chars: int  # characters per prompt


@dataclass(frozen=True)
class GenerateRequest:
    """A checked request: one image per prompt, sampled in ``steps`` steps from noise seeded by ``seed``."""

    prompts: tuple[str, ...]
    steps: int = 1
    seed: int = 0
    format: str = "json"


def parse_request(body: bytes, limits: Limits) -> GenerateRequest:
    """The request in ``body``, or ``BadRequest`` naming the first thing wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"malformed JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object with 'prompts', got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    if "prompts" in data and "prompt" in data:
        raise BadRequest("give 'prompts' (a list) or 'prompt' (a string), not both")
    prompts = _prompts(data, limits)
    steps = _integer(data, "steps", 1, 1, limits.max_steps)
    seed = _integer(data, "seed", 0, 0, MAX_SEED)
    fmt = data.get("format", "png" if len(prompts) == 1 and "prompt" in data else "json")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "png" and len(prompts) != 1:
        raise BadRequest(f"format 'png' returns one image: give one prompt, or format 'json' for {len(prompts)}")
    return GenerateRequest(tuple(prompts), steps, seed, fmt)


def _prompts(data: dict, limits: Limits) -> list[str]:
    if "prompt" in data:
        prompts = [data["prompt"]]
    elif "prompts" in data:
        prompts = data["prompts"]
        if not isinstance(prompts, list):
            raise BadRequest(f"'prompts' must be a list of strings, got {type(prompts).__name__}")
    else:
        raise BadRequest("no prompt: give 'prompts' (a list of strings) or 'prompt'")
    if not prompts:
        raise BadRequest("'prompts' is empty: give at least one prompt")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(f"{len(prompts)} prompts: at most {limits.max_prompts} per request", status=413)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt {i} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise BadRequest(f"prompt {i} is empty")
        if len(prompt) > limits.max_prompt_chars:
            raise BadRequest(f"prompt {i} has {len(prompt)} characters: at most {limits.max_prompt_chars}")
    return prompts


def _integer(data: dict, key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{key} must be in {low}..{high}, got {value}")
    return value
