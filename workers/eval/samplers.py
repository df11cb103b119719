"""A row's sampler, parsed from its name in a job file (``ddim:50``, ``dpmpp:8``, ``euler:28``, ``student:4``).

Imports nothing heavy: the job spec validates ``eval.table``'s sampler names with ``Sampler.parse``.
"""

from __future__ import annotations

from dataclasses import dataclass

# the teacher solvers of workers.add.sampler (not imported: it loads torch; a test checks they agree):
# DDIM and DPM-Solver++ for DDPM teachers, Euler and flow DPM-Solver++ for flow-matching ones
TEACHER_SOLVERS = ("ddim", "dpmpp", "euler", "flow-dpmpp")
SOLVER_NAMES = {
    "ddim": "DDIM",
    "dpmpp": "DPM-Solver++",
    "euler": "Euler",
    "flow-dpmpp": "flow DPM-Solver++",
    "add": "ADD",
}
SYNTAX = ", ".join(f"{s}:STEPS" for s in TEACHER_SOLVERS)


@dataclass(frozen=True)
class Sampler:
    """One row's sampler: who samples (``teacher`` / ``student``), how (``solver``), in how many steps."""

    model: str  # "teacher" or "student"
    solver: str  # one of TEACHER_SOLVERS for the teacher, "add" for the student
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
        """``"ddim:50"``, ``"dpmpp:8"``, ``"euler:28"``, ``"flow-dpmpp:20"`` (teacher) or ``"student:4"``."""
        solver, _, steps = text.partition(":")
        if solver not in (*TEACHER_SOLVERS, "student") or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"sampler {text!r}: expected {SYNTAX} or student:STEPS")
        if solver == "student":
            return cls("student", "add", int(steps))
        return cls("teacher", solver, int(steps), guidance_scale)
