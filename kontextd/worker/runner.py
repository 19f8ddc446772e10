"""The worker: claims queued requests, runs them through a backend, stores the images, ends the request."""

import logging
import secrets
import threading
import time
from collections.abc import Callable

from PIL import Image

from kontextd.backends.base import (
    Backend,
    Generated,
    GenerationCancelled,
    GenerationJob,
    GenerationOutOfMemory,
)
from kontextd.catalogue.endpoints import BY_APP_ID, GenerationParams, generation_params
from kontextd.catalogue.resolutions import output_size
from kontextd.fetch.guard import FetchError
from kontextd.jobs import outcomes
from kontextd.jobs.model import Job, Outcome
from kontextd.jobs.store import JobStore
from kontextd.storage.base import Storage
from kontextd.worker.encoding import CONTENT_TYPES, data_uri, encode_image

log = logging.getLogger("kontextd.worker")

ImageLoader = Callable[[str], Image.Image]  # fetches and decodes an image_url; raises FetchError


class Worker:
    def __init__(
        self,
        *,
        worker_id: str,
        store: JobStore,
        backend: Backend,
        storage: Storage,
        load_image: ImageLoader,
        notify: Callable[[str], None],
        lease_seconds: float = 60.0,
    ) -> None:
        self.worker_id = worker_id
        self._store = store
        self._backend = backend
        self._storage = storage
        self._load_image = load_image
        self._notify = notify
        self._lease_seconds = lease_seconds
        self.wake = threading.Event()  # set on submit so an idle worker starts at once

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                job = self._store.claim(self.worker_id, self._lease_seconds, time.time())
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
            self._log(job.request_id, "Loading the input image")
            try:
                image = self._load_image(params.image_url)
            except FetchError as error:
                return _image_error(error, params.image_url)
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        generation = GenerationJob(
            prompt=params.prompt,
            image=image,
            size=output_size(params.aspect_ratio, image.size if image else None),
            num_images=params.num_images,
            seed=seed,
            guidance_scale=params.guidance_scale,
            num_inference_steps=params.num_inference_steps,
        )
        generated = self._backend.generate(generation, self._step_reporter(job.request_id))
        return self._store_images(job, params, seed, generated)

    def _keep_lease(self, request_id: str, finished: threading.Event) -> None:
        """Renew the lease while the request runs, however long a fetch or a step takes."""
        while not finished.wait(self._lease_seconds / 3):
            self._store.renew_lease(request_id, self.worker_id, self._lease_seconds, time.time())

    def _step_reporter(self, request_id: str) -> Callable[[int, int], None]:
        def on_step(step: int, total: int) -> None:
            self._log(request_id, f"step {step}/{total}")
            if self._store.cancel_requested(request_id):
                raise GenerationCancelled

        return on_step

    def _store_images(self, job: Job, params: GenerationParams, seed: int, generated: Generated) -> Outcome:
        content_type = CONTENT_TYPES[params.output_format]
        described, keys = [], []
        for index, image in enumerate(generated.images):
            data = encode_image(image, params.output_format)
            if params.sync_mode:
                url = data_uri(data, params.output_format)
            else:
                key = f"{job.request_id}/{index}.{params.output_format}"
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
        return outcomes.succeeded(output, generated.inference_seconds, tuple(keys))

    def _log(self, request_id: str, message: str, level: str = "INFO") -> None:
        self._store.append_log(request_id, message, level, time.time())
        self._notify(request_id)


def _image_error(error: FetchError, url: str) -> Outcome:
    shown = url if not url.startswith("data:") else url[:40] + "…"  # never echo image bytes back
    detail = {"loc": ["body", "image_url"], "msg": error.message, "type": error.error_type, "input": shown}
    if error.ctx:
        detail["ctx"] = error.ctx
    return outcomes.invalid_input([detail], error.message)
