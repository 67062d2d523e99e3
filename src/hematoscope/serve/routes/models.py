"""GET /api/models: the served bundles."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from hematoscope.serve.analysis import explanation_method
from hematoscope.serve.deps import ModelsDep, require_token
from hematoscope.serve.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(require_token)])


@router.get("", response_model=ModelList)
def list_models(models: ModelsDep) -> ModelList:
    """Every served model (the first is the default), with its classes and trust settings."""
    default = next(iter(models))
    data = []
    for name, m in models.items():
        d = m.bundle.describe()
        data.append(ModelInfo(
            **m.info(), default=name == default, labels=d["labels"], input_size=d["input_size"],
            temperature=d["temperature"], abstain_threshold=d["abstain_threshold"], ood=d["ood"],
            ood_accept=d["ood_accept"], metrics=d["metrics"], metrics_of=d["metrics_of"],
            explanation=explanation_method(m), adapted_to=d["adapted_to"], answerable_classes=d["answerable_classes"],
        ))
    return ModelList(data=data, default=default)
