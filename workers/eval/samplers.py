"""A row's sampler, parsed from its name in a job file (``ddim:50``, ``dpmpp:8``, ``student:4``).

Imports nothing heavy: the job spec validates ``eval.table``'s sampler names with ``Sampler.parse``.
"""

from __future__ import annotations

from dataclasses import dataclass

SOLVER_NAMES = {"ddim": "DDIM", "dpmpp": "DPM-Solver++", "add": "ADD"}


@dataclass(frozen=True)
class Sampler:
    """One row's sampler: who samples (``teacher`` / ``student``), how (``solver``), in how many steps."""

    model: str  # "teacher" or "student"
    solver: str  # "ddim" / "dpmpp" for the teacher, "add" for the student
    steps: int
    guidance_scale: float = 1.0  # the teacher's CFG scale (the student takes none)

    @property
    def nfe(self) -> int:
        """Network evaluations per image: two per step with classifier-free guidance."""
        return self.steps * (2 if self.guidance_scale > 1 else 1)

    @property
    def key(self) -> str:
        return f"{self.model}-{self.solver}-{self.steps}"

    @property
    def family(self) -> str:
        """The table's sampler column, e.g. "teacher DDIM + CFG" or "ADD student"."""
        if self.model == "student":
            return "ADD student"
        return f"teacher {SOLVER_NAMES[self.solver]}" + (" + CFG" if self.guidance_scale > 1 else "")

    @classmethod
    def parse(cls, text: str, guidance_scale: float = 1.0) -> Sampler:
        """``"ddim:50"``, ``"dpmpp:8"`` (teacher) or ``"student:4"``."""
        solver, _, steps = text.partition(":")
        if solver not in ("ddim", "dpmpp", "student") or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"sampler {text!r}: expected ddim:STEPS, dpmpp:STEPS or student:STEPS")
        if solver == "student":
            return cls("student", "add", int(steps))
        return cls("teacher", solver, int(steps), guidance_scale)
