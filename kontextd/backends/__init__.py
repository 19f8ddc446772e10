"""Model backends. `load_backend` picks one by name; each turns validated requests into images."""

from kontextd.backends.base import Backend


def load_backend(name: str, *, tiny_step_seconds: float = 0.0) -> Backend:
    if name == "tiny":
        from kontextd.backends.pipeline import KontextPipelineBackend
        from kontextd.backends.tiny import TINY_RESOLUTION_SCALE, build_tiny_pipeline

        return KontextPipelineBackend(
            build_tiny_pipeline(),
            name="tiny",
            resolution_divisor=TINY_RESOLUTION_SCALE,
            min_step_seconds=tiny_step_seconds,
        )
    raise ValueError(f"unknown backend {name!r}")
