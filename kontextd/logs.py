"""Structured logs: one JSON object per line on stderr.

Callers pass fields with `extra=`; never API keys, prompts or image bytes. Tracebacks keep their stack but
show an exception's message only when kontextd or the OS wrote it: a library's message can quote its input
(FastAPI's validation error prints the whole request body, a pydantic error its values).
"""

import json
import logging
import sqlite3
import sys
import time
import traceback

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {key: value for key, value in vars(record).items() if key not in _STANDARD}
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = format_exception(record.exc_info[1])
        return json.dumps(entry, default=str)


def _message_is_safe(error: BaseException) -> bool:
    return type(error).__module__.startswith("kontextd") or isinstance(error, OSError | sqlite3.Error)


def format_exception(error: BaseException) -> str:
    """The traceback of `error` and its causes, innermost last, with untrusted messages withheld."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for link in reversed(chain):
        kind = type(link)
        name = (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        )
        message = str(link) if _message_is_safe(link) else "(message withheld: it may quote request data)"
        stack = "".join(traceback.format_list(traceback.extract_tb(link.__traceback__)))
        parts.append(f"Traceback (most recent call last):\n{stack}{name}: {message}")
    return "\n\nThe above exception led to the following one:\n\n".join(parts)


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # httpx logs every request line at info: upstream polls would flood the log and print providers'
    # signed output URLs. Our upstream backends log what matters themselves.
    logging.getLogger("httpx").setLevel(logging.WARNING)
