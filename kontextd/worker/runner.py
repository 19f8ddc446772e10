"""The worker: claims queued requests, runs them through a backend, stores the images, ends the request."""

import logging
import secrets
import threading
import time
from collections.abc import Callable

from PIL import Image

from kontextd.backends.base import (
    Backend,
    EncodedImage,
    Generated,
    GenerationCancelled,
    GenerationJob,
    GenerationOutOfMemory,
    GenerationRefused,
    ImageInput,
)
from kontextd.catalogue.endpoints import BY_APP_ID, GenerationParams, generation_params
from kontextd.fetch.guard import FetchError
from kontextd.jobs import outcomes
from kontextd.jobs.model import Job, Outcome
from kontextd.jobs.store import JobStore
from kontextd.storage.base import Storage
from kontextd.worker.encoding import CONTENT_TYPES, EXTENSIONS, data_uri, encode_image

log = logging.getLogger("kontextd.worker")

ImageLoader = Callable[[str], Image.Image]  # fetches and decodes an image_url; raises FetchError


class Worker:
    def __init__(
        self,
        *,
        worker_id: str,
        store: JobStore,
        backend: Backend,
        lane: str = "local",
        models: Callable[[str], str] = lambda app_id: "",
        storage: Storage,
        load_image: ImageLoader,
        notify: Callable[[str], None],
        lease_seconds: float = 60.0,
    ) -> None:
        self.worker_id = worker_id
        self._store = store
        self._backend = backend
        self._lane = lane
        self._models = models  # app id -> the model its route names, for backends serving several
        self._storage = storage
        self._load_image = load_image
        self._notify = notify
        self._lease_seconds = lease_seconds
        self.wake = threading.Event()  # set on submit so an idle worker starts at once

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                job = self._store.claim(self.worker_id, self._lease_seconds, time.time(), self._lane)
                if job is not None:
                    self._notify(job.request_id)
                    self.run(job)
                    continue
            except Exception:  # a store hiccup must not end the worker; a claimed job's lease lapses
                log.exception("worker loop failed")
            self.wake.wait(timeout=1.0)
            self.wake.clear()

    def run(self, job: Job) -> None:
        started = time.perf_counter()
        log.info("request started", extra={"request_id": job.request_id, "app_id": job.app_id})
        finished = threading.Event()
        heartbeat = threading.Thread(target=self._keep_lease, args=(job.request_id, finished), daemon=True)
        heartbeat.start()
        try:
            outcome = self._execute(job)
        except GenerationCancelled:
            outcome = outcomes.cancelled()
        except GenerationOutOfMemory as error:  # this request only: the worker and its model carry on
            log.warning("out of memory", extra={"request_id": job.request_id})
            outcome = outcomes.internal_error(str(error))
        except GenerationRefused as error:
            outcome = outcomes.refused(error.message, error.error_type, error.status_code)
        except FetchError as error:  # the input image, fetched when the backend first needed it
            outcome = _image_error(error, job.input.get("image_url", ""))
        except Exception as error:  # one bad request must not take the worker down
            log.exception("request failed", extra={"request_id": job.request_id})
            outcome = outcomes.internal_error(f"Generation failed: {type(error).__name__}: {error}")
        finally:
            finished.set()
        if not outcome.ok:
            self._log(job.request_id, f"Request failed: {outcome.error}", "ERROR")
        ended = self._store.complete(job.request_id, outcome, time.time(), worker_id=self.worker_id)
        log.info(
            "request ended",
            extra={
                "request_id": job.request_id,
                "status_code": outcome.status_code,
                "error_type": outcome.error_type,
                "seconds": round(time.perf_counter() - started, 3),
                "recorded": ended,
            },
        )
        self._notify(job.request_id)

    def _execute(self, job: Job) -> Outcome:
        if self._store.cancel_requested(job.request_id):
            raise GenerationCancelled
        endpoint = BY_APP_ID[job.app_id]
        params = generation_params(endpoint.input_model.model_validate(job.input))
        image = None
        if params.image_url is not None:
            image = ImageInput(params.image_url, self._load_image_logged(job.request_id))
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        generation = GenerationJob(
            prompt=params.prompt,
            image=image,
            aspect_ratio=params.aspect_ratio,
            num_images=params.num_images,
            seed=seed,
            guidance_scale=params.guidance_scale,
            num_inference_steps=params.num_inference_steps,
            output_format=params.output_format,
            safety_tolerance=params.safety_tolerance,
            enhance_prompt=params.enhance_prompt,
            acceleration=params.acceleration,
            model=self._models(job.app_id) or None,
        )
        generated = self._backend.generate(generation, RequestProgress(self, job.request_id))
        return self._store_images(job, params, seed, generated)

    def _load_image_logged(self, request_id: str) -> ImageLoader:
        def load(url: str) -> Image.Image:
            self._log(request_id, "Loading the input image")
            return self._load_image(url)

        return load

    def _keep_lease(self, request_id: str, finished: threading.Event) -> None:
        """Renew the lease while the request runs, however long a fetch or a step takes."""
        while not finished.wait(self._lease_seconds / 3):
            self._store.renew_lease(request_id, self.worker_id, self._lease_seconds, time.time())

    def _store_images(self, job: Job, params: GenerationParams, seed: int, generated: Generated) -> Outcome:
        described, keys = [], []
        for index, image in enumerate(generated.images):
            if isinstance(image, EncodedImage):  # an upstream's file: stored as it came, not re-encoded
                data, content_type = image.data, image.content_type
            else:
                data, content_type = (
                    encode_image(image, params.output_format),
                    CONTENT_TYPES[params.output_format],
                )
            extension = EXTENSIONS.get(content_type, params.output_format)
            if params.sync_mode:
                url = data_uri(data, content_type)
            else:
                key = f"{job.request_id}/{index}.{extension}"
                url = self._storage.put(key, data, content_type)
                keys.append(key)
            described.append(
                {"url": url, "width": image.width, "height": image.height, "content_type": content_type}
            )
        output = {
            "images": described,
            "timings": {"inference": round(generated.inference_seconds, 4)},
            "seed": seed,
            "has_nsfw_concepts": generated.has_nsfw_concepts,
            "prompt": params.prompt,
        }
        return outcomes.succeeded(output, generated.inference_seconds, tuple(keys), generated.served_by)

    def _log(self, request_id: str, message: str, level: str = "INFO") -> None:
        self._store.append_log(request_id, message, level, time.time())
        self._notify(request_id)


class RequestProgress:
    """A running request's progress: step and log lines into its logs; cancellation read from the store."""

    def __init__(self, worker: Worker, request_id: str) -> None:
        self._worker = worker
        self._request_id = request_id

    def step(self, step: int, total: int) -> None:
        self.log(f"step {step}/{total}")
        if self.cancelled():
            raise GenerationCancelled

    def log(self, message: str) -> None:
        self._worker._log(self._request_id, message)

    def cancelled(self) -> bool:
        return self._worker._store.cancel_requested(self._request_id)


def _image_error(error: FetchError, url: str) -> Outcome:
    shown = url if not url.startswith("data:") else url[:40] + "…"  # never echo image bytes back
    detail = {"loc": ["body", "image_url"], "msg": error.message, "type": error.error_type, "input": shown}
    if error.ctx:
        detail["ctx"] = error.ctx
    return outcomes.invalid_input([detail], error.message)
