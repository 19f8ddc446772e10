"""The worker: claims queued requests, runs them through a backend, stores the images, ends the request."""

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from PIL import Image

from kontextd import metrics
from kontextd.backends.base import (
    Backend,
    EncodedImage,
    Generated,
    GenerationCancelled,
    GenerationJob,
    GenerationOutOfMemory,
    GenerationRefused,
    InputUnusable,
)
from kontextd.catalogue.endpoints import BY_APP_ID, generation_job
from kontextd.jobs import outcomes
from kontextd.jobs.lifecycle import MAX_STORAGE_FAILURES
from kontextd.jobs.model import Job, Outcome, Release, State, Usage
from kontextd.jobs.store import JobStore, StoreUnavailable
from kontextd.routing import LOCAL
from kontextd.safety.checker import SafetyChecker, tolerance_of
from kontextd.shown import shown_text
from kontextd.storage.base import Storage, StorageUnavailable
from kontextd.storage.keys import output_key
from kontextd.storage.urls import KEY_FIELD
from kontextd.worker.encoding import CONTENT_TYPES, EXTENSIONS, data_uri, encode_image, preview_uri

log = logging.getLogger("kontextd.worker")

ImageLoader = Callable[[str], Image.Image]  # fetches and decodes an image_url; raises FetchError

STORAGE_PAUSE_FIRST = 1.0  # seconds a worker waits after images could not be stored, doubling each time
STORAGE_PAUSE_MAX = 60.0
STORE_RETRY_SECONDS = 2.0  # progress writes skipped this long after the store failed to take one
RECORD_RETRY_MAX = 10.0  # seconds between tries to record a request's end while the store is unavailable
AFFINITIES_KEPT = 8  # the last affinities a worker ran, what it is preferred for: as many as LoRA sets loaded


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
        safety: SafetyChecker | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._store = store
        self._backend = backend
        self.lane = lane  # the queue lane (backend) it claims from
        self._models = models  # app id -> the model its route names, for backends serving several
        self._storage = storage
        self._load_image = load_image
        self._notify = notify
        self._lease_seconds = lease_seconds
        self._safety = safety  # local lanes' images are checked; None: upstream lanes, or turned off
        self.wake = threading.Event()  # set on submit so an idle worker starts at once
        self._stop = threading.Event()  # the server is stopping: running requests are handed back
        self._storage_failures = 0  # in a row, on this worker: how long to pause before the next claim
        self._dropping_logs = False  # request log lines are being lost (disk full): said once, not per line
        # While the store cannot answer (a database restarting, a full disk), progress writes and cancel
        # reads are skipped until this monotonic time, rather than each step waiting out its own timeout.
        self._store_retry_at = 0.0
        self.current: str | None = None  # the request running now, for the runtime's shutdown
        # The affinities (runner hints, LoRA sets) of the last requests run, the latest last: the store
        # hands this worker such requests first when they are close behind the head of the queue.
        self._affinities: OrderedDict[str, None] = OrderedDict()
        # The heartbeat: one thread for the worker's life, told by `_beat` when the request running changes
        # (a thread a request would cost a start-up hand-off each time, under every other thread's load).
        self._beat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def run_forever(self, stop: threading.Event) -> None:
        self._stop = stop
        try:
            self._claim_and_run(stop)
        finally:
            self._beat.set()  # the heartbeat sees the stop, and ends

    def _claim_and_run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                job = self._store.claim(
                    self.worker_id,
                    self._lease_seconds,
                    time.time(),
                    self.lane,
                    prefer=tuple(self._affinities),
                )
                if job is not None:
                    self._notify(job.request_id)
                    self.run(job)
                    self._ran(job.affinity)
                    continue
            except StoreUnavailable as error:  # disk full or busy: try again shortly, no traceback each time
                log.warning("cannot claim work now", extra={"reason": str(error)})
            except Exception:  # a store hiccup must not end the worker; a claimed job's lease lapses
                log.exception("worker loop failed")
            self.wake.wait(timeout=1.0)
            self.wake.clear()

    def _ran(self, affinity: str | None) -> None:
        if affinity is None:
            return
        self._affinities[affinity] = None
        self._affinities.move_to_end(affinity)
        while len(self._affinities) > AFFINITIES_KEPT:
            self._affinities.popitem(last=False)

    def storage_pause(self, request_failures: int = 0) -> float:
        """Seconds to hold a request whose images could not be stored before handing it back: doubling
        with this worker's failures in a row and with the request's own, so neither this worker (with
        the next request) nor another one (with this request) tries again at once and spends all of a
        request's tries within one short outage."""
        failures = max(self._storage_failures, request_failures)
        if not failures:
            return 0.0
        return min(STORAGE_PAUSE_FIRST * 2 ** (failures - 1), STORAGE_PAUSE_MAX)

    def run(self, job: Job) -> None:
        started = time.perf_counter()
        log.info("request started", extra={"request_id": job.request_id, "app_id": job.app_id})
        metrics.request_started(job.app_id, job.created_at, job.started_at)
        self._running(job.request_id)
        try:
            ending = self._ending(job)
            tries = job.storage_failures + 1
            if ending is Release.STORAGE_FULL and tries < MAX_STORAGE_FAILURES:  # the last try ends at once
                self._stop.wait(self.storage_pause(tries))  # held, its lease renewed, then handed back
            # The lease is kept until the end is recorded: a store that is briefly unavailable (disk full)
            # must not make this request look abandoned.
            state = self._record(job, ending)
        finally:
            self._running(None)
        if state is State.COMPLETED and isinstance(ending, Outcome) and ending.ok:
            self._add_usage(job, ending)
        fields: dict[str, object] = {"request_id": job.request_id, "state": state}
        if isinstance(ending, Release):
            fields["released"] = ending.value
        else:
            fields |= {"status_code": ending.status_code, "error_type": ending.error_type}
        log.info("request ended", extra=fields | {"seconds": round(time.perf_counter() - started, 3)})
        metrics.request_ended(job.app_id, ending, state, time.perf_counter() - started)
        self._notify(job.request_id)

    def _ending(self, job: Job) -> Outcome | Release:
        """How the request ends: an outcome, or handed back to the queue (shutdown, disk full)."""
        try:
            outcome = self._execute(job)
        except GenerationCancelled:
            if self.handing_back(job.request_id):
                return Release.SHUTDOWN  # stopped between steps for the shutdown, not by the client
            outcome = outcomes.cancelled()
        except StorageUnavailable as error:
            self._storage_failures += 1
            log.warning(
                "images could not be stored", extra={"request_id": job.request_id, "reason": str(error)}
            )
            return Release.STORAGE_FULL
        except GenerationOutOfMemory as error:  # this request only: the worker and its model carry on
            log.warning("out of memory", extra={"request_id": job.request_id})
            outcome = outcomes.internal_error(str(error))
        except GenerationRefused as error:
            metrics.generation_refused(self.lane, error.error_type)
            outcome = outcomes.refused(error.message, error.error_type, error.status_code)
        except InputUnusable as error:  # an input image or LoRA, fetched when the backend first needed it
            outcome = _unusable_input(error)
        except Exception as error:  # one bad request must not take the worker down
            log.exception("request failed", extra={"request_id": job.request_id})
            outcome = outcomes.internal_error(f"Generation failed: {type(error).__name__}: {error}")
        if outcome.ok:
            self._storage_failures = 0
        else:
            self._log(job.request_id, f"Request failed: {outcome.error}", "ERROR")
        return outcome

    def _add_usage(self, job: Job, outcome: Outcome) -> None:
        """Count the completed request in its key's usage, once its end is recorded (so a re-run never
        counts it twice); best effort: a store that cannot take it now loses this request's figures."""
        images = [image for image in outcome.body.get("images", []) if isinstance(image, dict)]
        pixels = sum(int(image.get("width", 0)) * int(image.get("height", 0)) for image in images)
        # GPU seconds are this deployment's: an upstream API's time is billed by that API.
        seconds = float(outcome.metrics.get("inference_time", 0.0)) if self.lane == LOCAL else 0.0
        day = time.strftime("%Y-%m-%d", time.gmtime())
        usage = Usage(job.owner, job.app_id, day, 1, len(images), pixels / 1_000_000, seconds)
        try:
            self._store.add_usage(usage)
        except StoreUnavailable as error:
            log.warning("usage not counted", extra={"request_id": job.request_id, "reason": str(error)})

    def _record(self, job: Job, ending: Outcome | Release) -> State | None:
        """Record the end in the store, retrying while it cannot take writes. None: the job was no longer
        this worker's (its lease lapsed and it was taken over), or the server stopped first."""
        pause = 0.5
        while True:
            try:
                if isinstance(ending, Release):
                    return self._store.release(job.request_id, self.worker_id, ending, time.time())
                done = self._store.complete(job.request_id, ending, time.time(), worker_id=self.worker_id)
                return State.COMPLETED if done else None
            except StoreUnavailable as error:
                log.warning(
                    "cannot record the end of a request; retrying",
                    extra={"request_id": job.request_id, "reason": str(error), "retry_in": pause},
                )
            if self._stop.wait(pause):
                return None  # still running in the store: the next start re-queues it
            pause = min(pause * 2, RECORD_RETRY_MAX)

    def _execute(self, job: Job) -> Outcome:
        # No cancel check here: a job is claimed without the flag (a queued job cancelled ends at once, and
        # a flagged one handed back ends instead of being re-queued), and the backend asks between steps
        # and before it sends anything upstream.
        generation = generation_job(
            BY_APP_ID[job.app_id].input_model.model_validate(job.input),
            self._load_image_logged(job.request_id),
            model=self._models(job.app_id) or None,
        )
        generated = self._backend.generate(generation, RequestProgress(self, job))
        return self._store_images(job, generation, self._screened(job.request_id, generation, generated))

    def _screened(self, request_id: str, generation: GenerationJob, generated: Generated) -> Generated:
        """The images as the safety checker lets them out: flagged ones black, marked in has_nsfw_concepts.
        On the CPU after the decode, before encoding; a checker that fails fails the request, never
        returning an image unchecked."""
        tolerance = tolerance_of(generation)
        if self._safety is None or tolerance is None:
            return generated
        screening = self._safety.screen(generated, tolerance)
        log.info(
            "safety checked",
            extra={
                "request_id": request_id,
                "tolerance": tolerance,
                "threshold": screening.threshold,
                "scores": [None if score is None else round(score, 4) for score in screening.scores],
                "flagged": screening.flagged,
                "seconds": round(screening.seconds, 3),
            },
        )
        if screening.flagged:
            self._log(
                request_id,
                f"{screening.flagged} of {len(screening.scores)} image(s) withheld by the safety checker "
                "(black, flagged in has_nsfw_concepts)",
                "WARN",
            )
        return screening.generated

    def _load_image_logged(self, request_id: str) -> ImageLoader:
        def load(url: str) -> Image.Image:
            self._log(request_id, "Loading the input image")
            return self._load_image(url)

        return load

    def _running(self, request_id: str | None) -> None:
        """The request this worker runs now (None: none), told to the heartbeat, started the first time."""
        self.current = request_id
        self._beat.set()
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(
                target=self._keep_leases, name=f"{self.worker_id}-heartbeat", daemon=True
            )
            self._heartbeat.start()

    def _keep_leases(self) -> None:
        """Renew the running request's lease for as long as it runs, however long a fetch or a step takes:
        three beats a lease, so one slow or failed renewal does not let it lapse. Each change of request
        starts the count anew; the thread ends with the worker (its stop, then a beat)."""
        while not self._stop.is_set():
            self._beat.wait()
            self._beat.clear()
            request_id = self.current
            while request_id is not None and not self._beat.wait(self._lease_seconds / 3):
                if not self._renew(request_id):
                    break  # taken over: nothing to renew until the next request

    def _renew(self, request_id: str) -> bool:
        """One beat; False when the lease was lost (the request was taken over)."""
        try:
            if not self._store.renew_lease(request_id, self.worker_id, self._lease_seconds, time.time()):
                log.warning("lease lost: the request was taken over", extra={"request_id": request_id})
                return False
        except Exception as error:  # a full disk or a busy database: try again at the next beat
            log.warning("lease renewal failed", extra={"request_id": request_id, "reason": str(error)})
        return True

    def _store_images(self, job: Job, generation: GenerationJob, generated: Generated) -> Outcome:
        described, keys = [], []
        for index, image in enumerate(generated.images):
            if isinstance(image, EncodedImage):  # an upstream's file: stored as it came, not re-encoded
                data, content_type = image.data, image.content_type
            else:
                data, content_type = (
                    encode_image(image, generation.output_format),
                    CONTENT_TYPES[generation.output_format],
                )
            extension = EXTENSIONS.get(content_type, generation.output_format)
            where: dict[str, str]
            if generation.sync_mode:
                where = {"url": data_uri(data, content_type)}
            else:  # the key only: its URL is rendered per response (kontextd.storage.urls)
                key = output_key(job.request_id, index, extension)
                self._put(key, data, content_type, keys)
                keys.append(key)
                where = {KEY_FIELD: key}
            described.append(
                where | {"width": image.width, "height": image.height, "content_type": content_type}
            )
        output = {
            "images": described,
            "timings": {"inference": round(generated.inference_seconds, 4)},
            "seed": generation.seed,
            "has_nsfw_concepts": generated.has_nsfw_concepts,
            "prompt": generation.prompt,
        }
        metrics.images_made(job.app_id, len(described))
        return outcomes.succeeded(output, generated.inference_seconds, tuple(keys), generated.served_by)

    def _put(self, key: str, data: bytes, content_type: str, written: list[str]) -> None:
        """Store one image; when the storage cannot take it, remove this run's earlier images (a re-run
        writes them again; a request given up leaves nothing behind) and let StorageUnavailable through."""
        try:
            self._storage.put(key, data, content_type)
        except StorageUnavailable:
            try:
                self._storage.delete(written)
            except (OSError, StorageUnavailable):  # the sweep cannot know of them: said, not retried
                log.warning("could not remove partial outputs", extra={"keys": written})
            raise

    def _store_down(self) -> bool:
        return time.monotonic() < self._store_retry_at

    def _store_failed(self) -> None:
        self._store_retry_at = time.monotonic() + STORE_RETRY_SECONDS

    def handing_back(self, request_id: str) -> bool:
        """The server is stopping and the client did not cancel: the request goes back to the queue."""
        return self._stop.is_set() and not self.cancel_requested(request_id)

    def preview(self, request_id: str, image: Image.Image) -> None:
        """Keep the running request's latest preview, for status streams that ask: best effort, skipped
        while the store cannot take writes (a preview lost is replaced a few steps later)."""
        if self._store_down():
            return
        try:
            if self._store.set_preview(request_id, self.worker_id, preview_uri(image)):
                self._notify(request_id)
        except StoreUnavailable:
            self._store_failed()

    def checkpoint(self, request_id: str, name: str, value: str) -> None:
        """Keep an upstream task's handle for a re-run; when the store cannot take it now, a re-run starts
        that task anew (said once here, not retried: the task goes on meanwhile)."""
        try:
            if not self._store.checkpoint(request_id, self.worker_id, name, value):
                log.warning(
                    "checkpoint not kept: the request is no longer ours", extra={"request_id": request_id}
                )
        except StoreUnavailable as error:
            log.warning("checkpoint not kept", extra={"request_id": request_id, "reason": str(error)})

    def cancel_requested(self, request_id: str) -> bool:
        """Whether the client cancelled; False while the store cannot answer (a database restarting): the
        request runs on rather than failing, and a later step asks again."""
        if self._store_down():
            return False
        try:
            return self._store.cancel_requested(request_id)
        except StoreUnavailable as error:
            self._store_failed()
            log.warning(
                "cannot read the cancel flag now", extra={"request_id": request_id, "reason": str(error)}
            )
            return False

    def _log(self, request_id: str, message: str, level: str = "INFO") -> None:
        """A line in the request's own logs: best effort, so a full disk never stops or fails a request."""
        if self._store_down():
            return
        try:
            self._store.append_log(request_id, message, level, time.time())
        except StoreUnavailable as error:
            self._store_failed()
            if not self._dropping_logs:
                log.warning(
                    "request log lines are being dropped",
                    extra={"request_id": request_id, "reason": str(error)},
                )
            self._dropping_logs = True
            return
        self._dropping_logs = False
        self._notify(request_id)


class RequestProgress:
    """A running request's progress: step and log lines into its logs; cancellation read from the store;
    checkpoints kept in the store, and an earlier run's read from the job as it was claimed."""

    def __init__(self, worker: Worker, job: Job) -> None:
        self._worker = worker
        self._request_id = job.request_id
        self._resumed = job.checkpoints
        self._steps = metrics.StepTimer(worker.lane)  # steps per second, for /metrics

    def step(self, step: int, total: int) -> None:
        self._steps.step()
        self.log(f"step {step}/{total}")
        if self.cancelled():
            raise GenerationCancelled

    def log(self, message: str) -> None:
        self._worker._log(self._request_id, message)

    def preview(self, image: Image.Image) -> None:
        self._worker.preview(self._request_id, image)

    def cancelled(self) -> bool:
        """The client cancelled, or the server is stopping: either way the backend stops between steps."""
        return self._worker._stop.is_set() or self._worker.cancel_requested(self._request_id)

    def handing_back(self) -> bool:
        return self._worker.handing_back(self._request_id)

    def checkpoint(self, name: str, value: str) -> None:
        self._worker.checkpoint(self._request_id, name, value)

    def resumed(self, name: str) -> str | None:
        return self._resumed.get(name)


def _unusable_input(error: InputUnusable) -> Outcome:
    # Shown as the API shows a refused input: a data URI by its header and length, never its bytes.
    detail = {
        "loc": ["body", *error.field],
        "msg": error.message,
        "type": error.error_type,
        "input": shown_text(error.value),
    }
    if error.ctx:
        detail["ctx"] = error.ctx
    return outcomes.invalid_input([detail], error.message)
