"""`kontextd generate|status|result|cancel`: a small client of kontextd's fal-compatible queue API.

Nothing here imports the server stack (torch, FastAPI): the client starts fast and runs on machines
that have only httpx."""
