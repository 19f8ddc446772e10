"""How a value a client sent is shown back in an error: bounded, JSON-safe, and never image bytes.

One rule wherever a client's input is echoed: the API's validation errors and the errors a worker
records for a request (an input image that could not be fetched). A data URI shows its header and its
length; long text is cut; values JSON cannot carry (NaN, lone surrogates, bytes) become readable text.
"""

import math
from typing import Any

TEXT_SHOWN = 200  # characters of a string value echoed back in an error
ITEMS_SHOWN = 20  # entries of a list or object echoed back
DEPTH_SHOWN = 4


def shown(value: Any, depth: int = 0) -> Any:
    """A value from a request as an error may show it: bounded, JSON-safe, and never image bytes."""
    if isinstance(value, str):
        return shown_text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        digits = str(value)
        return value if len(digits) <= 40 else f"{digits[:20]}… ({len(digits)} digits)"
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if depth >= DEPTH_SHOWN:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        out = {shown_text(str(key)): shown(item, depth + 1) for key, item in items[:ITEMS_SHOWN]}
        if len(items) > ITEMS_SHOWN:
            out["…"] = f"{len(items) - ITEMS_SHOWN} more"
        return out
    if isinstance(value, list | tuple):
        out_list = [shown(item, depth + 1) for item in value[:ITEMS_SHOWN]]
        if len(value) > ITEMS_SHOWN:
            out_list.append(f"… {len(value) - ITEMS_SHOWN} more")
        return out_list
    return shown_text(str(value))  # an exception in ctx, a Decimal …


def shown_text(text: str) -> str:
    if text[:5].lower() == "data:":
        header = text[: min(text.find(",") + 1 or len(text), 100)]
        return f"{header}… ({len(text)} characters)"
    if len(text) > TEXT_SHOWN:
        text = f"{text[:TEXT_SHOWN]}… ({len(text)} characters)"
    # Lone surrogates cannot be written as UTF-8: show them as escapes.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
