"""Label selectors as metav1.LabelSelector defines them: all of matchLabels and matchExpressions
must hold (an empty selector matches everything)."""

from __future__ import annotations

from collections.abc import Mapping

from .objects import LabelSelector, Requirement


def _holds(req: Requirement, labels: Mapping[str, str]) -> bool:
    present = req.key in labels
    if req.operator == "In":
        return present and labels[req.key] in req.values
    if req.operator == "NotIn":
        return not present or labels[req.key] not in req.values
    if req.operator == "Exists":
        return present
    return not present  # DoesNotExist


def matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    return (all(labels.get(k) == v for k, v in selector.match_labels.items())
            and all(_holds(r, labels) for r in selector.match_expressions))
