"""Which devices the local model runs on: one pipeline, and one worker, per entry."""

from kontextd.backends.errors import BackendUnavailable


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _parse_gpus(gpus: str, count: int) -> list[int]:
    if gpus.strip() == "all":
        return list(range(count))
    try:
        indices = [int(part) for part in gpus.split(",") if part.strip()]
    except ValueError:
        raise BackendUnavailable(f"--gpus {gpus}: expected all, or GPU indices like 0,1") from None
    if not indices:
        raise BackendUnavailable(f"--gpus {gpus}: expected all, or GPU indices like 0,1")
    for index in indices:
        if not 0 <= index < count:
            raise BackendUnavailable(
                f"--gpus {gpus}: there is no GPU {index}; this machine has {count} CUDA device(s), "
                f"numbered 0 to {count - 1}"
            )
    if len(set(indices)) != len(indices):
        raise BackendUnavailable(f"--gpus {gpus}: a GPU is listed twice; each holds one pipeline")
    return indices


def select_devices(device: str, gpus: str | None, workers: int, cuda_count: int) -> tuple[str, ...]:
    """The device of each local worker. `device` is already resolved ("cpu", "cuda" or "cuda:N").

    Pipelines keep per-call state (scheduler steps, cache hooks), so no two workers may share one: on CUDA
    each selected GPU holds one pipeline and runs one worker; on the CPU, `workers` pipelines share it.
    """
    if gpus:
        if cuda_count == 0:
            raise BackendUnavailable(
                f"--gpus {gpus}: no CUDA device is available (torch.cuda.is_available() is False)"
            )
        if device not in ("cuda", "auto"):
            raise BackendUnavailable(f"--gpus {gpus} and --device {device}: choose the GPUs with one of them")
        return tuple(f"cuda:{index}" for index in _parse_gpus(gpus, cuda_count))
    if device == "cuda":
        if cuda_count == 0:
            raise BackendUnavailable("--device cuda: no CUDA device is available")
        return tuple(f"cuda:{index}" for index in range(cuda_count))
    if device.startswith("cuda:"):
        index = device.removeprefix("cuda:")
        if cuda_count == 0:
            raise BackendUnavailable(f"--device {device}: no CUDA device is available")
        if not index.isdigit() or int(index) >= cuda_count:
            raise BackendUnavailable(
                f"--device {device}: no such GPU; this machine has {cuda_count} CUDA device(s), "
                f"numbered 0 to {cuda_count - 1}"
            )
        return (device,)
    if device == "cpu":
        return ("cpu",) * max(workers, 1)
    raise BackendUnavailable(f"--device {device}: expected auto, cuda, cuda:N or cpu")
