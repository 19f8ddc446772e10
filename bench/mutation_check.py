"""Mutation check: plant realistic bugs one at a time in a copy of the repository; the tests must catch them.

    .venv/bin/python bench/mutation_check.py                  # every mutant, one at a time (tens of minutes)
    .venv/bin/python bench/mutation_check.py --list           # what each mutant changes and its tests
    .venv/bin/python bench/mutation_check.py --only NAME ...  # some of them
    .venv/bin/python bench/mutation_check.py --check          # only verify every mutant still applies

Each mutant is a one-line-ish change a developer could make by mistake (an off-by-one, an inverted or dropped
check, a wrong constant, a falsy-value slip), applied to a fresh copy of the working tree (tracked and
untracked files, uncommitted changes included; never the live checkout). Then the tests a developer would
run for that module run in the copy, and the mutant is killed only if they fail. The kill rate is printed
per area and overall; below GOAL the script exits non-zero, so it can gate a release.

Why not mutmut: the suite starts real server processes and takes about 15 minutes, so mutating every
operator would take days. A curated set with targeted tests runs in tens of minutes, and each mutant names
a bug that matters.

Before the mutants, the union of their tests runs once on an unmutated copy (the baseline): a test that
fails without any mutant would make every kill meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.95
DEFAULT_TIMEOUT = 900.0  # seconds for one mutant's tests: a hang is reported as a timeout, not waited out
AREAS = (
    "jobs",
    "api",
    "shown",
    "catalogue",
    "fetch",
    "storage",
    "webhooks",
    "worker",
    "safety",
    "runtime",
    "server",
)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in `file`
    replacement: str
    description: str
    tests: tuple[str, ...]  # pytest files or node ids; the mutant is killed only if these fail

    @property
    def area(self) -> str:
        parts = Path(self.file).parts  # kontextd/<area>/<module>.py, or kontextd/<module>.py
        return parts[1] if len(parts) > 2 else Path(self.file).stem


# -- the tests each mutant is checked against -------------------------------------------------------------

JOB_STORE = "tests/test_job_store.py"
HOSTILE = "tests/test_hostile_input.py"
FETCH_GUARD = "tests/test_fetch_guard.py"
FETCH_ADDRESSES = "tests/test_fetch_addresses.py"
IMAGE_LIMITS = "tests/test_image_limits.py"
SIGNING = "tests/test_webhook_signing.py"
RETENTION = "tests/test_retention.py"
UPLOADS = "test_uploads.py"
GAPS = "test_mutation_gaps.py"  # tests written for the mutants that survived the first run (2026-12-01)


def _node(file: str, *names: str) -> tuple[str, ...]:
    return tuple(f"tests/{file}::{name}" for name in names)


def _gap(*names: str) -> tuple[str, ...]:
    return _node(GAPS, *names)


QUEUE = "test_queue_flow.py"
DURABILITY = "test_durability.py"
WEBHOOKS = "test_webhooks.py"
AUTH = "test_auth.py"
VALIDATION = "test_api_validation.py"
KILL9 = _node(DURABILITY, "test_kill9_with_requests_queued_and_one_running_loses_and_duplicates_nothing")
LONG_LEASE = _node(DURABILITY, "test_a_request_running_far_longer_than_its_lease_runs_once")
NO_RETRY = _node(DURABILITY, "test_no_retry_ends_a_request_interrupted_by_a_crash_and_only_that_one")
WEBHOOK_GIVE_UP = _node(
    WEBHOOKS,
    "test_a_receiver_that_always_fails_gets_every_configured_try_then_is_given_up",
    "test_every_configured_try_then_the_delivery_is_recorded_failed",
)
DISPATCHER = _node(
    WEBHOOKS,
    "test_tries_to_one_receiver_are_limited_while_other_receivers_go_ahead",
    "test_tries_in_flight_are_capped_overall",
    "test_a_try_still_in_flight_past_its_deadline_is_not_sent_again",
    "test_every_configured_try_then_the_delivery_is_recorded_failed",
    "test_shutdown_stops_a_hanging_try_at_once_and_it_is_retried_with_the_same_id",
)
OTHER_KEYS = _node(
    AUTH, "test_other_keys_request_looks_unknown", "test_other_key_cannot_cancel_or_follow_a_running_request"
)

JOBS = "kontextd/jobs/sqlite.py"
SQL_STORE = "kontextd/jobs/sql_store.py"
STATEMENTS = "kontextd/jobs/statements.py"
LIFECYCLE = "kontextd/jobs/lifecycle.py"
AUTH_PY = "kontextd/api/auth.py"
APP_PY = "kontextd/api/app.py"
QUEUE_PY = "kontextd/api/queue.py"
ERRORS_PY = "kontextd/api/errors.py"
MIDDLEWARE_PY = "kontextd/api/middleware.py"
JSON_BODY_PY = "kontextd/api/json_body.py"
GUARD_PY = "kontextd/fetch/guard.py"
ADDRESSES_PY = "kontextd/fetch/addresses.py"
IMAGES_PY = "kontextd/fetch/images.py"
KEYS_PY = "kontextd/storage/keys.py"
LOCAL_PY = "kontextd/storage/local.py"
DELIVERY_PY = "kontextd/webhooks/delivery.py"
SIGNING_PY = "kontextd/webhooks/signing.py"
RUNNER_PY = "kontextd/worker/runner.py"
HOUSEKEEPING_PY = "kontextd/worker/housekeeping.py"


def M(
    name: str, file: str, original: str, replacement: str, description: str, *tests: str | Iterable[str]
) -> Mutant:
    flat: list[str] = []
    for entry in tests:
        flat.extend([entry] if isinstance(entry, str) else entry)
    return Mutant(name, file, original, replacement, description, tuple(flat))


MUTANTS: tuple[Mutant, ...] = (
    # -- jobs/: queue positions, claims, leases, cancel, recovery, pruning, webhook delivery states ---------
    M(
        "jobs-position-off-by-one",
        JOBS,
        "return (ticket - head) - self._holes_between(",
        "return (ticket - head + 1) - self._holes_between(",
        "queue position counts the job itself",
        JOB_STORE,
    ),
    M(
        "jobs-position-skips-retry-level",
        JOBS,
        "for level in range(Priority.RETRY, priority):",
        "for level in range(Priority.NORMAL, priority):",
        "re-queued (RETRY) jobs are not counted ahead of normal and low ones",
        JOB_STORE,
    ),
    M(
        "jobs-claim-order-swapped",
        STATEMENTS,
        'f" ORDER BY priority, ticket LIMIT 1{d.skip_locked}"',
        'f" ORDER BY ticket, priority LIMIT 1{d.skip_locked}"',
        "claim orders by ticket before priority",
        JOB_STORE,
    ),
    M(
        "jobs-complete-twice",
        SQL_STORE,
        'if row is None or row["state"] == State.COMPLETED:\n                return False',
        "if row is None:\n                return False",
        "a finished job can be completed again (a second outcome, a second webhook)",
        JOB_STORE,
    ),
    M(
        "jobs-cancel-other-owner",
        SQL_STORE,
        'if row is None or row["owner"] != owner:\n                return CancelResult.NOT_FOUND',
        "if row is None:\n                return CancelResult.NOT_FOUND",
        "cancel does not check the owner",
        JOB_STORE,
    ),
    M(
        "jobs-summary-other-owner",
        SQL_STORE,
        'if row is None or (owner is not None and row["owner"] != owner):\n            return None\n'
        "        return row",
        "if row is None:\n            return None\n        return row",
        "jobs and their status summaries are returned to any key",
        JOB_STORE,
        OTHER_KEYS,
    ),
    M(
        "jobs-commit-keeps-polls",
        JOBS,
        "self._poll_cache.changed(changed)",
        "pass",
        "a commit leaves the poll cache as it was: status polls answer what was before it",
        _node("test_job_store.py", "test_a_poll_sees_each_write_made_through_the_store_at_once"),
    ),
    M(
        "jobs-poll-cache-any-owner",
        "kontextd/jobs/poll_cache.py",
        "return polled if owner is None or owner == request_owner else None",
        "return polled",
        "a poll answered from memory (or read) goes to any key",
        _node(
            "test_poll_cache.py",
            "test_poll_reads_through_once_checks_the_owner_every_time_and_keeps_no_unknown_request",
        ),
        OTHER_KEYS,
    ),
    M(
        "jobs-cancel-leaves-no-hole",
        SQL_STORE,
        "self._leave_queue(transaction, row)\n"
        "                self._finish(transaction, row, outcomes.cancelled(), now)",
        "self._finish(transaction, row, outcomes.cancelled(), now)",
        "a job cancelled while queued leaves no hole: positions behind it stay one too high",
        JOB_STORE,
    ),
    M(
        "jobs-requeue-limit-off-by-one",
        LIFECYCLE,
        "if self.counter and count >= self.limit:",
        "if self.counter and count > self.limit:",
        "a request is re-run once more than its limit allows",
        JOB_STORE,
    ),
    M(
        "jobs-requeue-at-the-back",
        SQL_STORE,
        'self._enqueue(transaction, row["request_id"], row["lane"], Priority.RETRY)',
        'self._enqueue(transaction, row["request_id"], row["lane"], row["priority"])',
        "an interrupted request is re-queued at the back of its level, not the head",
        JOB_STORE,
        KILL9,
    ),
    M(
        "jobs-requeue-keeps-start-deadline",
        STATEMENTS,
        'started_at = NULL,"\n            f" start_deadline = NULL WHERE request_id = {p}"',
        'started_at = NULL"\n            f" WHERE request_id = {p}"',
        "a re-queued request keeps its start deadline and times out although it did start in time",
        JOB_STORE,
    ),
    M(
        "jobs-crash-counted-as-failure",
        LIFECYCLE,
        'INTERRUPTED = Requeue(\n    REQUEUED_RESTART,\n    "interruptions",',
        'INTERRUPTED = Requeue(\n    REQUEUED_RESTART,\n    "failures",',
        "a server crash is counted as the request's own failure",
        JOB_STORE,
    ),
    M(
        "jobs-max-interruptions-3",
        LIFECYCLE,
        "MAX_INTERRUPTIONS = 10",
        "MAX_INTERRUPTIONS = 3",
        "a request is failed after 3 server crashes instead of 10 (the old 'stopped 3 times' bug)",
        JOB_STORE,
        _gap("test_a_request_survives_nine_crashes_and_the_tenth_ends_it"),
    ),
    M(
        "jobs-prune-drops-pending-webhooks",
        STATEMENTS,
        '''f" AND hook.state NOT IN ('delivered', 'failed')) LIMIT {p}{d.skip_locked}"''',
        '''f" AND hook.state = 'sending') LIMIT {p}{d.skip_locked}"''',
        "pruning deletes a record whose webhook is still pending a retry",
        JOB_STORE,
    ),
    M(
        "jobs-due-forgets-lapsed-in-flight",
        STATEMENTS,
        '''f" WHERE state IN ('pending', 'sending') AND next_attempt_at <= {p}"''',
        '''f" WHERE state = 'pending' AND next_attempt_at <= {p}"''',
        "an in-flight delivery whose sender died is never due again",
        JOB_STORE,
    ),
    M(
        "jobs-release-webhooks-releases-pending",
        STATEMENTS,
        "next_attempt_at = {p} WHERE state = 'sending'\"",
        "next_attempt_at = {p} WHERE state IN ('pending', 'sending')\"",
        "releasing cut-short tries also makes waiting retries due at once (ignoring their backoff)",
        JOB_STORE,
    ),
    # -- api/: auth and owner checks, status codes, validation, body limit, headers, webhooks, proxy -------
    M(
        "api-auth-scheme-case-sensitive",
        AUTH_PY,
        'if scheme.lower() not in ("key", "bearer") or not presented:',
        'if scheme not in ("Key", "Bearer") or not presented:',
        "'key <k>' and 'bearer <k>' (lower case) are refused",
        _node(AUTH, "test_key_and_bearer_both_work", "test_missing_or_wrong_key_is_401"),
    ),
    M(
        "api-endpoints-listing-unauthenticated",
        APP_PY,
        "async def endpoints(services: ServicesDep, owner: Owner)",
        "async def endpoints(services: ServicesDep)",
        "/v1/endpoints answers without a key",
        _node(AUTH, "test_endpoint_listing_needs_a_key"),
    ),
    M(
        "api-find-ignores-app-prefix",
        QUEUE_PY,
        'if job is None or queue_prefix(job.app_id) != f"{app_owner}/{app_alias}":',
        "if job is None:",
        "a request answers under any app's queue path",
        _node(QUEUE, "test_unknown_request_ids"),
    ),
    M(
        "api-status-always-200",
        QUEUE_PY,
        "code = 200 if job.state == State.COMPLETED else 202",
        "code = 200",
        "status answers 200 while queued or running (fal says 202)",
        _node(QUEUE, "test_status_codes_logs_and_progress", "test_result_before_completion"),
    ),
    M(
        "api-result-while-running",
        QUEUE_PY,
        "if job is None or job.state != State.COMPLETED or job.output_expired:",
        "if job is None or job.state == State.IN_QUEUE or job.output_expired:",
        "the result route serves a running request (whose outcome is not there yet)",
        _node(QUEUE, "test_result_before_completion"),
    ),
    M(
        "api-validation-infinity-unshown",
        "kontextd/shown.py",
        "if math.isfinite(value):\n            return value",
        "if not math.isnan(value):\n            return value",
        "the validation handler echoes Infinity as a float, which JSON cannot carry (a 500)",
        HOSTILE,
    ),
    M(
        "api-validation-header-errors-all",
        ERRORS_PY,
        'in_headers = any(entry["loc"][:1] == ["header"] for entry in detail)',
        'in_headers = all(entry["loc"][:1] == ["header"] for entry in detail)',
        "a bad header next to a bad body answers 422, not 400",
        _node(
            VALIDATION, "test_body_and_header_errors_are_reported_together", "test_queue_priority_header_enum"
        ),
    ),
    M(
        "api-body-limit-per-chunk",
        MIDDLEWARE_PY,
        'received += len(message.get("body", b""))',
        'received = len(message.get("body", b""))',
        "the body cap counts each chunk alone: an undeclared chunked 100 MB body is accepted",
        HOSTILE,
    ),
    M(
        "api-proxy-target-host-inverted",
        MIDDLEWARE_PY,
        "if not host.startswith(ROOT_HOSTS):",
        "if host.startswith(ROOT_HOSTS):",
        "a proxied call to queue.fal.run goes to the run routes and one to fal.run to the queue",
        HOSTILE,
        _gap(
            "test_a_proxied_queue_host_goes_to_the_queue_routes_and_a_run_host_to_the_run_routes",
            "test_a_proxied_submit_to_the_queue_host_is_queued",
        ),
    ),
    M(
        "api-empty-webhook-is-a-webhook",
        QUEUE_PY,
        "if not url:  # `?fal_webhook=` with nothing after it: no webhook",
        "if url is None:  # `?fal_webhook=` with nothing after it: no webhook",
        "an empty fal_webhook= is taken as a URL (and refused)",
        HOSTILE,
    ),
    M(
        "api-webhook-not-checked-at-submit",
        QUEUE_PY,
        "        await fetcher.check(url)\n    except FetchError as error:",
        "        pass\n    except FetchError as error:",
        "a webhook URL the guard refuses is accepted at submit (and fails ten times later)",
        HOSTILE,
    ),
    M(
        "api-empty-lifecycle-header-refused",
        QUEUE_PY,
        "if not header:  # absent, or sent empty",
        "if header is None:  # absent, or sent empty",
        "an empty X-Fal-Object-Lifecycle-Preference is a 400, not the default",
        HOSTILE,
    ),
    M(
        "api-no-retry-ignored",
        QUEUE_PY,
        'no_retry=no_retry in ("1", "true"),',
        'no_retry=no_retry == "true",',
        "x-fal-no-retry: 1 is ignored over HTTP",
        NO_RETRY,
    ),
    M(
        "api-request-timeout-zero-accepted",
        QUEUE_PY,
        "gt=0,\n                le=MAX_START_WAIT_SECONDS,",
        "ge=0,\n                le=MAX_START_WAIT_SECONDS,",
        "X-Fal-Request-Timeout: 0 is accepted (a request that can never start)",
        _node(VALIDATION, "test_request_timeout_header"),
        HOSTILE,
    ),
    M(
        "api-body-without-content-type-accepted",
        JSON_BODY_PY,
        "if not content_type:\n        return False",
        "if not content_type:\n        return True",
        "a body without Content-Type is parsed as JSON (a cross-site form could queue work)",
        HOSTILE,
    ),
    # -- fetch/: guard address checks, size and time caps, image limits ---------------------------------
    M(
        "fetch-allow-list-truthiness",
        GUARD_PY,
        "if reason is not None and not self._allow.allows(host, ip):",
        "if reason is not None and not self._allow:",
        "any non-empty allow-list lets every internal address through",
        FETCH_GUARD,
    ),
    M(
        "fetch-first-answer-only",
        GUARD_PY,
        "for ip in addresses:\n            reason = refusal_reason(ip)",
        "for ip in addresses[:1]:\n            reason = refusal_reason(ip)",
        "only the first resolved address is vetted (DNS answers with a good and a bad one pass)",
        FETCH_GUARD,
    ),
    M(
        "fetch-size-cap-per-chunk",
        GUARD_PY,
        "if received > limit:\n                    raise too_large",
        "if len(chunk) > limit:\n                    raise too_large",
        "the download cap applies to each chunk, not the whole body",
        FETCH_GUARD,
    ),
    M(
        "fetch-no-whole-fetch-timeout",
        GUARD_PY,
        "async with asyncio.timeout(self._limits.timeout_seconds):\n"
        "                return await self._get(url)",
        "async with asyncio.timeout(None):\n                return await self._get(url)",
        "a server trickling bytes keeps a fetch going past the timeout",
        FETCH_GUARD,
    ),
    M(
        "fetch-private-range-narrowed",
        ADDRESSES_PY,
        '(_v4("172.16.0.0/12"), "private"),',
        '(_v4("172.16.0.0/16"), "private"),',
        "172.17.0.0-172.31.255.255 (Docker networks) count as public",
        FETCH_ADDRESSES,
        FETCH_GUARD,
    ),
    M(
        "fetch-image-side-and",
        IMAGES_PY,
        "if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:",
        "if width > MAX_IMAGE_SIDE and height > MAX_IMAGE_SIDE:",
        "an image too large on one side only is decoded",
        FETCH_GUARD,
        IMAGE_LIMITS,
    ),
    M(
        "fetch-pillow-bomb-limit-default",
        IMAGES_PY,
        "Image.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE\n",
        "",
        "Pillow's own pixel limit refuses images within the documented 14142 px a side",
        IMAGE_LIMITS,
        FETCH_GUARD,
    ),
    M(
        "fetch-exotic-formats",
        IMAGES_PY,
        "with Image.open(io.BytesIO(data), formats=_FORMATS) as image:",
        "with Image.open(io.BytesIO(data)) as image:",
        "every format Pillow knows is decoded (EPS, ICNS ...), not web formats only",
        FETCH_GUARD,
    ),
    # -- storage/: the key grammar, symlink refusal --------------------------------------------------------
    M(
        "storage-path-check-loosened",
        LOCAL_PY,
        'if not keys.is_valid(key):\n            return None\n        folder, name = key.split("/")',
        'if ".." in key.split("/"):\n            return None\n        folder, name = key.split("/", 1)',
        "open() checks for '..' instead of the key grammar",
        HOSTILE,
        _gap(
            "test_open_reads_only_files_the_grammar_names",
            "test_files_after_a_real_request_folder_stay_inside_storage",
        ),
    ),
    M(
        "storage-key-prefix-match",
        KEYS_PY,
        "return _OUTPUT_KEY.fullmatch(key) is not None",
        "return _OUTPUT_KEY.match(key) is not None",
        "a key with anything after a valid one passes the grammar",
        HOSTILE,
        _gap("test_anything_else_is_not_a_key", "test_files_after_a_real_request_folder_stay_inside_storage"),
    ),
    M(
        "storage-follows-symlinks",
        LOCAL_PY,
        "_NO_FOLLOW = os.O_NOFOLLOW\n",
        "_NO_FOLLOW = 0\n",
        "a symlink planted in the storage root is followed",
        HOSTILE,
    ),
    M(
        "storage-symlink-is-an-error",
        LOCAL_PY,
        "if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):",
        "if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):",
        "a symlinked file is a 500, not a 404",
        HOSTILE,
    ),
    M(
        "storage-serves-non-regular-files",
        LOCAL_PY,
        "        if not stat.S_ISREG(info.st_mode):\n            os.close(fd)\n            return None\n",
        "",
        "a directory (or fifo) where an output would be is opened and served",
        HOSTILE,
        _gap("test_a_directory_where_an_output_would_be_is_absent"),
    ),
    # -- webhooks/: signing, backoff count, per-target limits, in-flight marking --------------------------
    M(
        "webhooks-one-try-fewer",
        DELIVERY_PY,
        "if not final and tries <= len(self._backoff):",
        "if not final and tries < len(self._backoff):",
        "one webhook try fewer than configured",
        WEBHOOK_GIVE_UP,
    ),
    M(
        "webhooks-plain-client",
        DELIVERY_PY,
        "code = await self._fetcher.post(delivery.url, body, headers)",
        "code = (await httpx.AsyncClient().post(delivery.url, content=body, headers=headers)).status_code",
        "webhooks are sent with a plain HTTP client that bypasses the fetch guard",
        _node(WEBHOOKS, "test_a_webhook_target_the_guard_refuses_is_never_contacted_and_the_delivery_fails"),
    ),
    M(
        "webhooks-per-target-off-by-one",
        DELIVERY_PY,
        "self._busy[target] >= self._per_target",
        "self._busy[target] > self._per_target",
        "one try more than --webhook-concurrency in flight to a receiver",
        DISPATCHER,
    ),
    M(
        "webhooks-overall-off-by-one",
        DELIVERY_PY,
        "if len(self._tries) >= self._overall:\n                    return",
        "if len(self._tries) > self._overall:\n                    return",
        "one try more than the overall cap in flight",
        DISPATCHER,
    ),
    M(
        "webhooks-target-ignores-port",
        DELIVERY_PY,
        'return f"{parsed.scheme}://{parsed.host}:{port}"',
        'return f"{parsed.scheme}://{parsed.host}"',
        "receivers on different ports of one host share one concurrency limit",
        DISPATCHER,
    ),
    M(
        "webhooks-resent-while-in-flight",
        DELIVERY_PY,
        "if due.delivery_id in self._tries or self._busy[target]",
        "if self._busy[target]",
        "a try still in flight past its deadline is sent again beside itself",
        DISPATCHER,
    ),
    M(
        "webhooks-refusal-retried",
        DELIVERY_PY,
        "return False, failure.message, failure.refused",
        "return False, failure.message, False",
        "a webhook URL the guard refuses is tried again and again, as if it might pass",
        _node(WEBHOOKS, "test_a_webhook_target_the_guard_refuses_is_never_contacted_and_the_delivery_fails"),
    ),
    M(
        "webhooks-3xx-delivered",
        DELIVERY_PY,
        "delivered = 200 <= code < 300",
        "delivered = code < 400",
        "a redirect (not followed) counts as delivered",
        DISPATCHER,
        _gap("test_a_receiver_answering_a_redirect_has_not_received_the_webhook"),
    ),
    M(
        "webhooks-signed-fields-swapped",
        SIGNING_PY,
        '"\\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()))',
        '"\\n".join((user_id, request_id, timestamp, hashlib.sha256(body).hexdigest()))',
        "the signed message puts the user id first: fal receivers cannot verify it",
        SIGNING,
    ),
    # -- worker/: the runner and housekeeping ---------------------------------------------------------------
    M(
        "worker-seed-zero-is-no-seed",
        "kontextd/catalogue/endpoints.py",
        "seed=seed if seed is not None else secrets.randbelow(SEED_MAX + 1),",
        "seed=seed or secrets.randbelow(SEED_MAX + 1),",
        "seed 0 is treated as no seed",
        _node(QUEUE, "test_seed_zero_is_a_seed"),
        _node(VALIDATION, "test_seed_zero_is_a_seed_not_an_absent_one"),
    ),
    M(
        "worker-lease-never-renewed",
        RUNNER_PY,
        "                if not self._renew(request_id):\n",
        "                if True:\n",
        "the lease is never renewed while a request runs",
        LONG_LEASE,
    ),
    M(
        "worker-cancel-ignored-while-running",
        RUNNER_PY,
        "return self._worker._stop.is_set() or self._worker.cancel_requested(self._request_id)",
        "return self._worker._stop.is_set()",
        "a running request ignores the client's cancel",
        _node(QUEUE, "test_cancel_a_running_request"),
    ),
    M(
        "worker-reports-requested-seed",
        RUNNER_PY,
        '"seed": generation.seed,',
        '"seed": job.input.get("seed"),',
        "an unseeded request reports seed null, not the seed it used",
        _node(QUEUE, "test_seed_reproduces_images"),
    ),
    M(
        "worker-image-error-echoes-data-uri",
        RUNNER_PY,
        '"input": shown_text(error.value),',
        '"input": error.value,',
        "an input image that fails to load echoes its whole data URI in the result",
        HOSTILE,
        _node(QUEUE, "test_run_route_with_an_image_that_is_not_one"),
        _gap("test_an_input_image_that_fails_to_load_is_summarised_in_the_result"),
    ),
    M(
        "housekeeping-no-lease-sweep",
        HOUSEKEEPING_PY,
        '"requeued": store.recover_abandoned(now, settle_seconds=lease_seconds),',
        '"requeued": 0,',
        "the sweep never re-queues requests whose worker died (lapsed lease)",
        RETENTION,
        LONG_LEASE,
        _gap("test_a_sweep_requeues_a_request_whose_lease_lapsed"),
    ),
    M(
        "housekeeping-no-start-deadline-sweep",
        HOUSEKEEPING_PY,
        '"timed_out": store.expire_unstarted(now),',
        '"timed_out": 0,',
        "a queued request past its start deadline waits until a worker is free to time out",
        RETENTION,
        _node(QUEUE, "test_request_timeout_is_a_deadline_to_start"),
        _gap("test_a_sweep_times_out_a_queued_request_past_its_start_deadline"),
    ),
    M(
        "housekeeping-retention-ignored",
        HOUSEKEEPING_PY,
        "store.prune_records(now - record_retention, BATCH)",
        "store.prune_records(now, BATCH)",
        "records are pruned as soon as their outputs expire, ignoring --record-retention",
        RETENTION,
    ),
    # -- safety/: the checker's threshold, blackout and opt-out ----------------------------------------------
    M(
        "safety-threshold-exclusive",
        "kontextd/safety/checker.py",
        "hit = score >= threshold",
        "hit = score > threshold",
        "an image scoring exactly its tolerance's threshold is let by",
        _node("test_safety.py", "test_a_score_at_the_threshold_is_flagged_and_just_below_is_not"),
    ),
    M(
        "safety-flagged-image-kept",
        "kontextd/safety/checker.py",
        "images.append(blacked_out(image) if hit else image)",
        "images.append(image)",
        "a flagged image is returned as made, only its flag set",
        _node(
            "test_safety.py",
            "test_a_score_at_the_threshold_is_flagged_and_just_below_is_not",
            "test_thresholds_at_0_black_out_every_image_of_the_same_size",
        ),
    ),
    M(
        "safety-dev-opt-out-ignored",
        "kontextd/safety/checker.py",
        "    if not job.enable_safety_checker:\n        return None\n",
        "    if False:\n        return None\n",
        "enable_safety_checker false on [dev] is checked anyway",
        _node("test_safety.py", "test_enable_safety_checker_false_on_dev_is_not_checked"),
    ),
    # -- uploads: fal's storage API (kontextd/api/uploads.py and what it stands on) -------------------
    M(
        "api-upload-of-another-key-is-an-input",
        "kontextd/api/own_files.py",
        "if uploaded_by != owner:",
        "if uploaded_by is None:",
        "one key's upload is accepted as another key's input",
        _node(UPLOADS, "test_an_upload_by_one_key_is_no_input_for_another"),
    ),
    M(
        "api-upload-signature-not-compared",
        "kontextd/api/upload_signing.py",
        "and hmac.compare_digest(signature, self.upload_signature(key, int(expires)))",
        "and len(signature) == 64",
        "any 64 hex digits pass for an upload URL's signature",
        _node(
            UPLOADS,
            "test_forged_and_expired_upload_urls_are_403_in_fals_shape",
            "test_tokens_and_upload_urls_are_signed_apart_and_expire",
        ),
    ),
    M(
        "worker-sweep-forgets-uploads-keeping-files",
        HOUSEKEEPING_PY,
        "        storage.delete(uploads)  # files first",
        "        pass  # files first",
        "expired uploads are forgotten but their files stay for ever",
        _node(UPLOADS, "test_the_sweep_deletes_expired_uploads_and_their_records"),
    ),
    # -- server start-up ------------------------------------------------------------------------------
    M(
        "postgres-claim-waits-for-locked-rows",
        "kontextd/jobs/postgres.py",
        "ORDER BY priority, ticket LIMIT 1 FOR UPDATE SKIP LOCKED\n",
        "ORDER BY priority, ticket LIMIT 1 FOR UPDATE\n",
        "a claim waits for the job another node is claiming instead of skipping past it",
        "tests/test_postgres_store.py::test_a_claim_skips_a_job_another_node_holds_instead_of_waiting",
    ),
    M(
        "postgres-requeues-live-nodes-work-at-start",
        "kontextd/jobs/postgres.py",
        'are re-queued by recover_abandoned once their leases lapse."""\n        return 0',
        'are re-queued by recover_abandoned once their leases lapse."""\n'
        "        return self.recover_abandoned(math.inf)",
        "a starting node re-queues every running job, though other nodes are running them",
        "tests/test_postgres_store.py::test_recover_after_restart_requeues_nothing_in_a_shared_store",
    ),
    M(
        "postgres-no-settling-after-an-outage",
        SQL_STORE,
        "if time.monotonic() - self._unreachable_at < settle_seconds:",
        "if False:",
        "after a database outage, leases of live workers are taken over before they can renew",
        "tests/test_scale_out.py::test_postgresql_restarted_mid_run_loses_nothing_and_nodes_answer_503_meanwhile",
    ),
    M(
        "storage-urls-frozen-to-one-origin",
        "kontextd/storage/urls.py",
        'return self._public_url or request_base.rstrip("/")',
        'return self._public_url or "http://127.0.0.1:8000"',
        "image URLs name a fixed origin, not the one the client called",
        "tests/test_scale_out.py::test_what_one_node_accepts_every_node_serves_and_a_kill9_loses_nothing",
    ),
    M(
        "worker-storage-retry-not-held",
        RUNNER_PY,
        "self._stop.wait(self.storage_pause(tries))",
        "self._stop.wait(0)",
        "a request whose images could not be stored is handed back at once: a short outage uses its tries",
        "tests/test_scale_out.py::test_s3_down_for_a_while_never_completes_a_request_without_its_images",
    ),
    M(
        "server-embedded-key-in-database",
        "kontextd/server.py",
        "    if store.shared:\n        return WebhookSigner.from_pem(",
        "    if not store.shared:\n        return WebhookSigner.from_pem(",
        "the embedded server stops keeping its signing key in the data dir (receivers' JWKS changes)",
        ("tests/test_hostile_input.py::test_secrets_are_private_and_outside_storage",),
    ),
    M(
        "server-no-start-up-recovery",
        "kontextd/runtime.py",
        "requeued = store.recover_after_restart(now)",
        "requeued = 0",
        "start-up recovery removed: interrupted requests wait for their lease to lapse",
        KILL9,
    ),
)


# -- checking that every mutant still applies -------------------------------------------------------------


class MutantDrift(Exception):
    """The code a mutant changes is no longer there exactly once: the set needs updating."""


def mutated(source: str, mutant: Mutant) -> str:
    count = source.count(mutant.original)
    if count != 1:
        raise MutantDrift(
            f"{mutant.name}: the original snippet occurs {count} times in {mutant.file}, not once"
        )
    return source.replace(mutant.original, mutant.replacement, 1)


_TEST_NAME = re.compile(r"^(?:async )?def (\w+)\(", re.MULTILINE)


def problems(root: Path = ROOT, mutants: Sequence[Mutant] = MUTANTS) -> list[str]:
    """Everything that would make a mutant meaningless: its snippet not there exactly once, a mutated file
    that does not compile, a test file or test function that does not exist, a duplicate name."""
    found: list[str] = []
    names = [mutant.name for mutant in mutants]
    found += [f"duplicate mutant name {name}" for name in sorted({n for n in names if names.count(n) > 1})]
    for mutant in mutants:
        if mutant.area not in AREAS:
            found.append(f"{mutant.name}: unknown area {mutant.area}")
        if mutant.original == mutant.replacement:
            found.append(f"{mutant.name}: the replacement changes nothing")
        path = root / mutant.file
        if not path.is_file():
            found.append(f"{mutant.name}: {mutant.file} does not exist")
        else:
            try:
                compile(mutated(path.read_text(), mutant), str(path), "exec")
            except MutantDrift as error:
                found.append(str(error))
            except SyntaxError as error:
                found.append(f"{mutant.name}: the mutated {mutant.file} does not compile ({error})")
        if not mutant.tests:
            found.append(f"{mutant.name}: no tests named")
        for test in mutant.tests:
            file, _, name = test.partition("::")
            if not (root / file).is_file():
                found.append(f"{mutant.name}: test file {file} does not exist")
            elif name and name.split("[")[0] not in _TEST_NAME.findall((root / file).read_text()):
                found.append(f"{mutant.name}: no test {name} in {file}")
    return found


# -- running ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    area: str
    outcome: str  # killed, survived, timeout (a hang: caught, by the harness's timeout) or error
    seconds: float
    failed: list[str]  # the tests that failed (killed) or why the run was an error
    tail: str  # the end of pytest's output

    @property
    def caught(self) -> bool:
        return self.outcome in ("killed", "timeout")


def repository_files(root: Path) -> list[str]:
    """Tracked and untracked (not ignored) files, as they are in the working tree now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    # A tracked file deleted in the working tree is not copied: the copy is the working tree.
    return sorted({name for name in listed.split("\0") if name and os.path.lexists(root / name)})


def copy_tree(root: Path, files: Sequence[str], destination: Path) -> None:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)


def copy_environment(copy: Path) -> dict[str, str]:
    """The copy's code first on the path: the venv's editable install points at the live checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports_from(copy: Path) -> None:
    """Fail loudly if the copy would test the live checkout's code instead of its own."""
    probe = "import kontextd, kontextd.server; print(kontextd.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, env=copy_environment(copy), capture_output=True, text=True
    )
    if found.returncode != 0 or not Path(found.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy imports kontextd from {found.stdout.strip() or found.stderr}, not {copy}")


# pytest's summary lines; node ids may hold spaces, and captured log lines start with ERROR too.
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+\.py(?:::.+?)?)(?: - .*)?$", re.MULTILINE)


def run_pytest(
    copy: Path, tests: Sequence[str], timeout: float, stop_first: bool = True
) -> tuple[str, str, str]:
    """Run `tests` in `copy`: (outcome, failed tests, output tail). Killed = pytest reported failures."""
    basetemp = copy.parent / "pytest-tmp"
    command = [
        sys.executable,
        "-m",
        "pytest",
        *tests,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--basetemp={basetemp}",
    ]
    if stop_first:
        command.append("-x")  # one failure kills the mutant: the rest need not run
    # A session of its own: on a timeout the servers the tests started are killed with pytest.
    process = subprocess.Popen(
        command,
        cwd=copy,
        env=copy_environment(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return "timeout", "", output[-4000:]
    finally:
        # Whatever the tests left running (a server a failed test did not stop) goes with the session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    failed = "\n".join(_FAILED.findall(output))
    if process.returncode == 0:
        return "survived", "", output[-4000:]
    if process.returncode in (1, 2):  # 1: tests failed; 2: collection failed (an import broke)
        return "killed", failed, output[-4000:]
    return "error", f"pytest exited with {process.returncode}", output[-4000:]


def run_mutant(mutant: Mutant, files: Sequence[str], timeout: float, keep: bool) -> Result:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"kontextd-mutant-{mutant.name}-"))
    try:
        copy = work / "repo"
        copy_tree(ROOT, files, copy)
        path = copy / mutant.file
        path.write_text(mutated(path.read_text(), mutant))
        outcome, failed, tail = run_pytest(copy, mutant.tests, timeout)
    except MutantDrift as error:
        outcome, failed, tail = "error", str(error), ""
    finally:
        if keep:
            print(f"  kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return Result(
        mutant.name, mutant.area, outcome, round(time.monotonic() - started, 1), failed.split("\n"), tail
    )


def union_of_tests(mutants: Sequence[Mutant]) -> list[str]:
    """Every test the mutants name, once: a whole file makes its node ids redundant."""
    tests = list(dict.fromkeys(test for mutant in mutants for test in mutant.tests))
    whole = {test for test in tests if "::" not in test}
    return [test for test in tests if "::" not in test or test.partition("::")[0] not in whole]


def probe(files: Sequence[str]) -> None:
    """Without a baseline, still make sure a copy tests its own code."""
    work = Path(tempfile.mkdtemp(prefix="kontextd-mutant-probe-"))
    try:
        copy_tree(ROOT, files, work / "repo")
        check_imports_from(work / "repo")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def baseline(files: Sequence[str], mutants: Sequence[Mutant], timeout: float) -> None:
    """The mutants' tests on the unmutated copy: they must pass, or no kill means anything."""
    work = Path(tempfile.mkdtemp(prefix="kontextd-mutant-baseline-"))
    try:
        copy = work / "repo"
        copy_tree(ROOT, files, copy)
        check_imports_from(copy)
        tests = union_of_tests(mutants)
        print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
        started = time.monotonic()
        outcome, failed, tail = run_pytest(copy, tests, timeout, stop_first=False)
        print(
            f"baseline: {'passed' if outcome == 'survived' else outcome}"
            f" in {time.monotonic() - started:.0f} s"
        )
        if outcome != "survived":
            raise SystemExit(f"the baseline does not pass, so kills would mean nothing:\n{failed}\n{tail}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- reporting -------------------------------------------------------------------------------------------


def summary(results: Sequence[Result]) -> dict[str, dict[str, float]]:
    by_area: dict[str, dict[str, float]] = {}
    for area in [*AREAS, "overall"]:
        chosen = [r for r in results if area in ("overall", r.area)]
        if not chosen:
            continue
        caught = sum(r.caught for r in chosen)
        by_area[area] = {
            "mutants": len(chosen),
            "killed": caught,
            "survived": sum(r.outcome == "survived" for r in chosen),
            "errors": sum(r.outcome == "error" for r in chosen),
            "rate": caught / len(chosen),
        }
    return by_area


def print_table(results: Sequence[Result]) -> None:
    width = max(len(r.name) for r in results)
    print(f"\n{'mutant':<{width}}  {'area':<8}  {'outcome':<8}  {'seconds':>7}  caught by")
    for r in results:
        by = r.failed[0] if r.outcome == "killed" and r.failed and r.failed[0] else ""
        print(f"{r.name:<{width}}  {r.area:<8}  {r.outcome:<8}  {r.seconds:>7.1f}  {by}")
    print(f"\n{'area':<8}  {'mutants':>7}  {'killed':>6}  {'survived':>8}  {'errors':>6}  {'rate':>6}")
    for area, row in summary(results).items():
        print(
            f"{area:<8}  {row['mutants']:>7.0f}  {row['killed']:>6.0f}  {row['survived']:>8.0f}"
            f"  {row['errors']:>6.0f}  {row['rate']:>6.1%}"
        )


def print_list(mutants: Sequence[Mutant]) -> None:
    for mutant in mutants:
        print(f"{mutant.name}  [{mutant.area}]  {mutant.file}\n    {mutant.description}")
        for test in mutant.tests:
            print(f"    - {test}")


def select(names: Sequence[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    known = {mutant.name: mutant for mutant in MUTANTS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(unknown)} (see --list)")
    return [known[name] for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--check", action="store_true", help="only verify that every mutant still applies")
    parser.add_argument(
        "--jobs", type=int, default=1, help="mutants at once (default 1: the tests are heavy)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for one mutant's tests"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--keep", action="store_true", help="keep each mutated copy (to look at a survivor)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    mutants = select(args.only)
    if args.list:
        print_list(mutants)
        return 0
    found = problems(ROOT, mutants)
    if found:
        print("mutants that no longer apply (update bench/mutation_check.py):", *found, sep="\n  ")
        return 2
    if args.check:
        print(f"all {len(mutants)} mutants apply")
        return 0

    files = repository_files(ROOT)
    started = time.monotonic()
    if args.no_baseline:
        probe(files)
    else:
        baseline(files, mutants, args.timeout * 2)
    print(f"{len(mutants)} mutants, {args.jobs} at a time, {args.timeout:g} s each at most", flush=True)
    lock = threading.Lock()

    def one(mutant: Mutant) -> Result:
        result = run_mutant(mutant, files, args.timeout, args.keep)
        with lock:
            print(f"  {result.outcome:<8} {result.seconds:>6.1f} s  {mutant.name}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, mutants))
    print_table(results)
    elapsed = time.monotonic() - started
    overall = summary(results)["overall"]
    print(f"\nkill rate {overall['rate']:.1%} (goal {GOAL:.0%}), {elapsed / 60:.1f} minutes in all")
    for r in results:
        if not r.caught:
            print(f"\n-- {r.outcome}: {r.name}: {select([r.name])[0].description}\n{r.tail[-1500:]}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "goal": GOAL,
                    "seconds": round(elapsed, 1),
                    "summary": summary(results),
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
    return 0 if overall["rate"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
