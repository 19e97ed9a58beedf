"""Coverage-guided fuzz targets (atheris), run with ``python -m tests.fuzz NAME``.

See README.md beside this file. Nothing here is collected by pytest: the targets are
``*_target.py`` modules, and atheris is imported only when one runs.
"""

from __future__ import annotations

import itertools
import random
import zlib


def cuts(data: bytes, most: int = 16) -> list[bytes]:
    """``data`` cut at points drawn from its own hash: the same input, the same cuts."""
    draw = random.Random(zlib.crc32(data))
    points = sorted({0, len(data), *(draw.randint(0, len(data)) for _ in range(most - 1))})
    return [data[a:b] for a, b in itertools.pairwise(points)]
