"""Istio objects checked against Istio's CRD schemas, as packaged on PyPI.

`cloudcoil-models-istio` ships pydantic models generated from the OpenAPI schemas of
Istio's CRDs (enums as Literals, types, field names). Pydantic ignores unknown keys by
default, and an unknown key is exactly what a misspelt EnvoyFilter field is (Istio's own
validation rejects it; our YAML would be silently wrong), so `check` also walks the
object and reports every key that the schema does not name: the strict check
`kubectl apply` would do against the CRD's structural schema.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Final

from cloudcoil.models.istio.networking import v1alpha3, v1beta1
from pydantic import BaseModel

__all__ = ["KINDS", "check"]

KINDS: Final[dict[tuple[str, str], type[BaseModel]]] = {
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): v1alpha3.EnvoyFilter,
    ("networking.istio.io/v1beta1", "ServiceEntry"): v1beta1.ServiceEntry,
    ("networking.istio.io/v1beta1", "DestinationRule"): v1beta1.DestinationRule,
    ("networking.istio.io/v1beta1", "Gateway"): v1beta1.Gateway,
    ("networking.istio.io/v1beta1", "VirtualService"): v1beta1.VirtualService,
}


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes inside an annotation (Optional[...], List[...], ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        return [model for arg in typing.get_args(annotation) for model in _models(arg)]
    return []  # scalars, Literals, Dict[str, Any] (free-form Envoy config): no walk


def _unknown(model: type[BaseModel], data: Any, where: str) -> list[str]:
    if isinstance(data, list):
        return [found for index, item in enumerate(data)
                for found in _unknown(model, item, f"{where}[{index}]")]
    if not isinstance(data, dict):
        return []
    by_key = {(field.alias or name): field for name, field in model.model_fields.items()}
    found: list[str] = []
    for key, value in data.items():
        field = by_key.get(key)
        if field is None:
            found.append(f"{where}.{key}".lstrip("."))
            continue
        # A oneOf becomes a Union of models: a key is unknown only if every one rejects it.
        verdicts = [set(_unknown(inner, value, f"{where}.{key}"))
                    for inner in _models(field.annotation)]
        if verdicts:
            found.extend(sorted(set.intersection(*verdicts)))
    return found


def check(document: dict[str, Any]) -> list[str]:
    """Problems of one Istio object: schema errors, then keys the schema does not know."""
    model = KINDS.get((document.get("apiVersion", ""), document.get("kind", "")))
    if model is None:
        return [f"no schema for {document.get('apiVersion')}/{document.get('kind')}"]
    try:
        model.model_validate(document)
    except ValueError as exc:
        return [str(exc)]
    return [f"unknown field {path}" for path in _unknown(model, document, "")]
