"""The Kontext output-size table and how a request picks an entry from it."""

# (width, height) pairs Kontext was trained at: about one megapixel, sides multiples of 16.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def ratio_of(aspect_ratio: str) -> float:
    """'16:9' -> 1.777…"""
    width, height = aspect_ratio.split(":")
    return int(width) / int(height)


def nearest_resolution(ratio: float) -> tuple[int, int]:
    """The table entry whose width/height is closest to `ratio`."""
    return min(KONTEXT_RESOLUTIONS, key=lambda size: abs(size[0] / size[1] - ratio))


def output_size(aspect_ratio: str | None, input_size: tuple[int, int] | None) -> tuple[int, int]:
    """Width and height for a request: the named aspect ratio, else the input image's, else square."""
    if aspect_ratio is not None:
        return nearest_resolution(ratio_of(aspect_ratio))
    if input_size is not None:
        return nearest_resolution(input_size[0] / input_size[1])
    return (1024, 1024)


def scaled(size: tuple[int, int], divisor: int, multiple: int = 16) -> tuple[int, int]:
    """Shrink a table entry for a small model, keeping sides multiples of `multiple` (at least one)."""
    return tuple(max(multiple, round(side / divisor / multiple) * multiple) for side in size)  # type: ignore[return-value]
