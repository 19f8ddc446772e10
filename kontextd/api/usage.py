"""GET /v1/usage: what the calling key used (every key's, for an admin key), by endpoint and day.

What an operator reselling access bills from: requests completed with images, images, megapixels and
seconds on this deployment's GPUs, per (key, endpoint, UTC day), kept apart from the jobs (which are
pruned) by the job store. Keys are shown by their owner id (`key-<hash>`), never themselves.
"""

import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from kontextd.api.deps import Owner, ServicesDep
from kontextd.api.responses import BAD_PARAMETER, UNAUTHORIZED
from kontextd.jobs.model import Usage

DEFAULT_DAYS = 30
MAX_DAYS = 366
SINCE = f"First day (UTC), included. Default: {DEFAULT_DAYS} days before until."


class UsageRow(BaseModel):
    day: str = Field(description="The UTC day, YYYY-MM-DD.")
    owner: str = Field(description="The key, by its owner id (key-…): never the key itself.")
    app_id: str
    requests: int = Field(description="Requests completed with images.")
    images: int
    megapixels: float
    gpu_seconds: float = Field(description="Seconds of inference on this deployment's GPUs (0 upstream).")


class UsageTotals(BaseModel):
    requests: int
    images: int
    megapixels: float
    gpu_seconds: float


class UsageReport(BaseModel):
    owner: str = Field(description="The calling key's owner id.")
    admin: bool = Field(description="Whether the report covers every key (an admin key).")
    since: datetime.date
    until: datetime.date
    usage: list[UsageRow] = Field(description="Per day, key and endpoint, in that order.")
    totals: UsageTotals


# A day as YYYY-MM-DD only: pydantic's date would also take 0 (a unix time), which the schema does not say.
DAY: dict[str, Any] = {"pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "json_schema_extra": {"format": "date"}}


def _invalid(name: str, message: str, value: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ["query", name], "msg": message, "type": "value_error", "input": value}]
    )


def _day(name: str, value: str | None) -> datetime.date | None:
    if value is None:
        return None
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise _invalid(name, "not a day: expected YYYY-MM-DD", value) from None


def _totals(rows: list[Usage]) -> UsageTotals:
    return UsageTotals(
        requests=sum(row.requests for row in rows),
        images=sum(row.images for row in rows),
        megapixels=round(sum(row.megapixels for row in rows), 6),
        gpu_seconds=round(sum(row.gpu_seconds for row in rows), 3),
    )


async def usage(
    services: ServicesDep,
    owner: Owner,
    since: Annotated[str | None, Query(description=SINCE, **DAY)] = None,
    until: Annotated[
        str | None, Query(description="Last day (UTC), included. Default: today.", **DAY)
    ] = None,
    of: Annotated[
        str | None,
        Query(
            alias="owner",
            max_length=64,
            description="Only this owner id's usage: any key for an admin key, else the caller's own "
            "(another's is empty).",
        ),
    ] = None,
) -> UsageReport:
    last = _day("until", until) or datetime.datetime.now(datetime.UTC).date()
    first = _day("since", since) or last - datetime.timedelta(days=DEFAULT_DAYS - 1)
    if first > last or (last - first).days >= MAX_DAYS:
        message = f"must be on or before until, at most {MAX_DAYS} days before it"
        raise _invalid("since", message, first.isoformat())
    since, until = first.isoformat(), last.isoformat()
    admin = services.authenticator.is_admin(owner)
    # Another key's usage, asked for without an admin key, is none at all: it looks like a key that used
    # nothing, as another key's request looks like an unknown one.
    rows = []
    if admin or of is None or of == owner:
        whose = of if of is not None else (None if admin else owner)
        rows = await run_in_threadpool(services.store.usage, since, until, whose)
    return UsageReport(
        owner=owner,
        admin=admin,
        since=first,
        until=last,
        usage=[
            UsageRow(
                day=row.day,
                owner=row.owner,
                app_id=row.app_id,
                requests=row.requests,
                images=row.images,
                megapixels=round(row.megapixels, 6),
                gpu_seconds=round(row.gpu_seconds, 3),
            )
            for row in rows
        ],
        totals=_totals(rows),
    )


router = APIRouter()
router.add_api_route(
    "/v1/usage",
    usage,
    methods=["GET"],
    tags=["server"],
    summary="Usage of the calling key (every key's for an admin key), by endpoint and day",
    response_model=UsageReport,
    responses={
        **UNAUTHORIZED,
        **BAD_PARAMETER,
    },
)
