"""Grid sizes as text and numbers: the axis names, ``AUTOPAR_GRID``'s format, and the check of a
requested grid against a world size.

Why a module of its own, with no torch import: ``autopar run`` parses ``--grid`` and checks it
against ``-n`` before it starts anything, and it should not spend seconds importing torch on a
login node to do so (the ranks it starts import torch themselves). The launcher and
``autopar.init`` share these functions, so a grid the launcher accepts is one every rank accepts.
"""
from __future__ import annotations

AXES: tuple[str, ...] = ("pp", "dp", "z", "y", "x")
TP_AXES: tuple[str, ...] = ("z", "y", "x")
BATCH_AXES: tuple[str, ...] = ("dp", "z")  # the axes that cut the global batch (z: the 3D matmul's depth)

GRID_ENV = "AUTOPAR_GRID"
"""Grid sizes for a script that calls ``autopar.init()`` without grid arguments, e.g.
``AUTOPAR_GRID=pp=2,x=2``. ``autopar run --grid`` sets it, so the grid is a launch option rather
than a code change."""


def parse_grid(text: str) -> dict[str, int]:
    """``"pp=2,x=2"`` -> ``{"pp": 2, "x": 2}``. Empty text is the empty grid; anything that is not
    ``axis=positive integer`` with a known, unrepeated axis raises ``ValueError``."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        axis, eq, size = (s.strip() for s in item.partition("="))
        if axis not in AXES or not eq or not size.isdigit() or int(size) < 1:
            raise ValueError(f"bad grid entry {item!r} in {text!r}: use axis=size pairs such as "
                             f"'pp=2,dp=2,x=2' with axes from {AXES} and positive sizes")
        if axis in sizes:
            raise ValueError(f"grid axis {axis!r} is given twice in {text!r}")
        sizes[axis] = int(size)
    return sizes


def resolve_sizes(world_size: int, pp: int = 1, dp: int | None = None, x: int = 1, y: int = 1,
                  z: int = 1) -> dict[str, int]:
    """Check a requested grid against the world size and infer ``dp``. Raises ``ValueError``
    with the sizes and the fix; every rank computes the same answer, so all of them raise."""
    named = {"pp": pp, "x": x, "y": y, "z": z}
    if dp is not None:
        named["dp"] = dp
    for name, size in named.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"grid axis {name}={size!r} must be a positive integer")
    model_ranks = pp * x * y * z
    if dp is None:
        if world_size % model_ranks:
            raise ValueError(
                f"world size {world_size} is not divisible by pp*x*y*z = {model_ranks} "
                f"(pp={pp}, x={x}, y={y}, z={z}); launch a multiple of {model_ranks} ranks "
                "or choose a grid whose product divides the world size")
        dp = world_size // model_ranks
    if model_ranks * dp != world_size:
        raise ValueError(
            f"grid pp={pp} dp={dp} x={x} y={y} z={z} has {model_ranks * dp} ranks but the world "
            f"has {world_size}; launch {model_ranks * dp} ranks, or leave dp out to infer it")
    return {"pp": pp, "dp": dp, "z": z, "y": y, "x": x}
