"""KServe v1-style classification for people: instances in, labels and probabilities out."""

from __future__ import annotations

import time

from fastapi import APIRouter

from service import inference
from service.api.deps import BodyDep, ServiceDep
from service.api.errors import OUTCOME, http_error
from service.api.schemas import Prediction, Predictions
from service.errors import ServiceError
from service.metrics import UNKNOWN_MODEL

router = APIRouter(prefix="/v1/models", tags=["inference"])
BODY_DOC = {"requestBody": {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"instances": {"type": "array"}}, "required": ["instances"]}}}}}


@router.post("/{name}:predict", openapi_extra=BODY_DOC)
async def predict(name: str, body: BodyDep, service: ServiceDep) -> Predictions:
    """Classify each instance with the newest version: label, class index, softmax probabilities."""
    start = time.perf_counter()
    label = name if name in service.repository.models else UNKNOWN_MODEL
    try:
        rows = await inference.predict(service.repository, name, None, body)
    except ServiceError as exc:
        error = http_error(exc, service.settings.retry_after_s)
        service.metrics.request(label, OUTCOME.get(error.status_code, "error"))
        raise error from None
    service.metrics.request(label, "success", time.perf_counter() - start)
    return Predictions(predictions=[Prediction(**row) for row in rows])
