"""The serving-only app (``distill serve``): the Open Inference Protocol routes, ``/v1/jobs/{id}
/predict`` and health, nothing else. Stateless: it reads the database and the artifact storage
that the API and workers write, so any number can run beside them."""

from fastapi import Depends, FastAPI

from app.main import add_common_parts, refuse_unstorable_text
from app.serving.router import predict_router, router
from app.serving.v2 import router as v2_router


def create_serving_app() -> FastAPI:
    app = FastAPI(
        title="Distill serving",
        version="0.1.0",
        description="Distill's students, served: Open Inference Protocol v2 and /predict.",
        dependencies=[Depends(refuse_unstorable_text)],
    )
    app.include_router(predict_router, prefix=router.prefix)
    app.include_router(v2_router)
    return add_common_parts(app)
