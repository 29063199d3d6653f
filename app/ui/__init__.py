"""The dashboard at ``/ui``: static pages whose scripts call the REST API (no build step, no
server of their own). Left out of the OpenAPI document: these are pages, not API."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import NotFound

STATIC = Path(__file__).parent / "static"
# The files served, by name: a fixed set, so no request names a path.
MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "job.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "job.js": "text/javascript; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "NOTICE.uPlot.txt": "text/plain; charset=utf-8",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


def _page(name: str) -> FileResponse:
    # Pages change with the package: always revalidated (the ETag answers 304 when unchanged).
    return FileResponse(
        STATIC / name, media_type=MEDIA_TYPES[name], headers={"Cache-Control": "no-cache"}
    )


@router.get("")
def jobs_page() -> FileResponse:
    """The jobs, with their status and progress."""
    return _page("index.html")


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    """One job: live curves, results, downloads, predict. The page reads the job over the API."""
    return _page("job.html")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """The pages' scripts and styles."""
    if name not in MEDIA_TYPES:
        raise NotFound(f"No dashboard file named {name}.")
    return _page(name)
