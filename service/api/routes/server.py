"""Server metadata."""

from __future__ import annotations

from fastapi import APIRouter

from bnfold._version import __version__
from service.api.schemas import ServerMetadata

router = APIRouter(tags=["metadata"])

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_repository_versions", "kserve_v1_predict",
              "prometheus_metrics"]


@router.get("/v2")
async def server_metadata() -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(name="bnfold", version=__version__, extensions=EXTENSIONS)
