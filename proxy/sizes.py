"""Image sizes: normalising what clients write, and what each model accepts.

``gpt-image-2-vip`` takes exactly 30 sizes (three tiers, ten ratios); ``gpt-image-2-all``
takes any ``WxH`` with a long edge of 512 to 1536. Both take ``auto``. The upstream
wants a lowercase ASCII ``x``; clients write ``×``, ``X``, ``*``, full-width digits.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from .config import ModelSettings

AUTO = "auto"
# Ratio order 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9.
VIP_TIERS: dict[str, tuple[str, ...]] = {
    "1K": ("1280x1280", "848x1280", "1280x848", "960x1280", "1280x960",
           "1024x1280", "1280x1024", "720x1280", "1280x720", "1280x544"),
    "2K": ("2048x2048", "1360x2048", "2048x1360", "1536x2048", "2048x1536",
           "1632x2048", "2048x1632", "1152x2048", "2048x1152", "2048x864"),
    "4K": ("2880x2880", "2336x3520", "3520x2336", "2480x3312", "3312x2480",
           "2560x3216", "3216x2560", "2160x3840", "3840x2160", "3840x1632"),
}  # fmt: skip
VIP_SIZES: tuple[str, ...] = tuple(s for tier in VIP_TIERS.values() for s in tier)
ALL_LONG_EDGE = (512, 1536)

_SEPARATOR = re.compile(r"\s*[x×✕✖*]\s*", re.IGNORECASE)
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


def normalise_size(raw: str) -> str:
    """``" 2048 × 1152 "`` → ``"2048x1152"``; anything unparsable is left for the table."""
    text = unicodedata.normalize("NFKC", raw).strip()
    if text.lower() == AUTO:
        return AUTO
    return _SEPARATOR.sub("x", text, count=1) if _SEPARATOR.search(text) else text


def parse(size: str) -> tuple[int, int] | None:
    match = _SIZE.fullmatch(size)
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True)
class SizeTable:
    """The sizes one model accepts: an explicit list, or a long-edge range."""

    sizes: tuple[str, ...] = ()
    long_edge: tuple[int, int] | None = None

    @classmethod
    def for_model(cls, model: ModelSettings) -> SizeTable:
        if model.sizes:
            return cls(sizes=tuple(model.sizes))
        if model.name.endswith("-all"):
            return cls(long_edge=ALL_LONG_EDGE)
        if model.name.startswith("gpt-image-2"):
            return cls(sizes=VIP_SIZES)
        return cls()

    def accepts(self, size: str) -> bool:
        if size == AUTO:
            return True
        if self.long_edge is not None:
            parsed = parse(size)
            return parsed is not None and self.long_edge[0] <= max(parsed) <= self.long_edge[1]
        return size in self.sizes

    def nearest(self, size: str, k: int = 3) -> list[str]:
        """Valid sizes closest to ``size``: the shape counts twice as much as the area."""
        parsed = parse(size)
        if self.long_edge is not None:
            low, high = self.long_edge
            if parsed is None:
                return ["1024x1024", "1536x1024", "1024x1536"][:k]
            w, h = parsed
            scale = min(max(max(w, h), low), high) / max(w, h)
            return [f"{max(1, round(w * scale))}x{max(1, round(h * scale))}"]
        if not self.sizes:
            return [AUTO]
        if parsed is None:
            return list(self.sizes[:k])
        w, h = parsed

        def distance(candidate: str) -> float:
            cw, ch = parse(candidate) or (1, 1)
            shape = abs(math.log((cw / ch) / (w / h)))
            return 2 * shape + abs(math.log((cw * ch) / (w * h)))

        return sorted(self.sizes, key=distance)[:k]
