"""What every route handler depends on: the process's services, and the caller's identity.

Handlers are module-level functions; the services they work with are the app's (`app.state.services`,
set by create_app), so a handler names what it needs in its signature and nothing is built per app.
"""

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security

from kontextd.api.auth import authorization_header
from kontextd.api.services import Services


async def services_of(request: Request) -> Services:
    # async, though it awaits nothing: FastAPI runs a plain `def` dependency in a thread, a hop per request.
    return request.app.state.services


def owner_of(services: Services, authorization: str | None) -> str:
    """The owner id of the caller's API key; 401 in fal's shape when it carries none that is valid."""
    owner = services.authenticator.owner_for(authorization)
    if owner is None:
        detail = "Missing or invalid API key: send 'Authorization: Key <key>' or 'Bearer <key>'"
        raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Key"})
    return owner


async def require_owner(request: Request, authorization: str | None = Security(authorization_header)) -> str:
    return owner_of(request.app.state.services, authorization)


ServicesDep = Annotated[Services, Depends(services_of)]
Owner = Annotated[str, Depends(require_owner)]
