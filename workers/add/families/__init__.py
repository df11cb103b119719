"""The model families a teacher (and so a student) can be: one small file each.

``FAMILIES`` lists them; ``family_for`` picks one from a folder's network config, ``family_of`` from a
built network. The next family (Qwen-Image, Z-Image, FLUX.2) is a ``TransformerFamily`` subclass in
its own file and one entry here.
"""

from __future__ import annotations

from torch import nn

from workers.add.families.base import Family, TeacherFolder, TeacherParts, TransformerFamily
from workers.add.families.flux import FluxFamily
from workers.add.families.sana import SanaFamily
from workers.add.families.sd3 import SD3Family
from workers.add.families.unet import UNetFamily

FAMILIES: tuple[Family, ...] = (UNetFamily(), SD3Family(), FluxFamily(), SanaFamily())
NETWORK_FOLDERS = tuple(dict.fromkeys(f.folder for f in FAMILIES))  # "unet", "transformer"

__all__ = [
    "FAMILIES",
    "NETWORK_FOLDERS",
    "Family",
    "TeacherFolder",
    "TeacherParts",
    "TransformerFamily",
    "family_for",
    "family_of",
    "supported_classes",
]


def supported_classes(folder: str) -> list[str]:
    """The network classes a ``unet/`` or ``transformer/`` subfolder may hold."""
    return [name for f in FAMILIES if f.folder == folder for name in f.classes]


def family_for(folder: str, class_name: str | None, source: str = "") -> Family:
    """The family whose ``folder``/config.json names ``class_name``, or an error naming the supported ones."""
    for family in FAMILIES:
        if family.folder == folder and class_name in family.classes:
            return family
    where = f"{source}: " if source else ""
    raise ValueError(
        f"{where}{folder}/config.json names the unsupported class {class_name!r}; "
        f"supported are {', '.join(supported_classes(folder))}"
    )


def family_of(net: nn.Module) -> Family | None:
    """The family of a built network; None for any other callable network (the toy problem's MLPs)."""
    for family in FAMILIES:
        if family.owns(net):
            return family
    return None
