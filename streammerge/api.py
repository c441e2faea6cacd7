"""The library façade: ``plan_merge``, ``merge``, ``finalize``, ``iter_merged``, ``plan_unmerge`` and ``unmerge``.

Each entry point is a straight line: read headers → build the plan → execute. Errors are typed
(``streammerge.errors``); nothing here prints. The entry points live by concern and are re-exported here,
the import path the README and integrations use:

* ``merging`` (:func:`plan_merge`, :func:`merge`), ``unmerging`` (:func:`plan_unmerge`, :func:`unmerge`),
  ``iterate`` (:func:`iter_merged`), ``split_merge`` (parts, Ray, :func:`finalize`);
* ``prepare`` (inputs, options and plan; devices), ``run`` (executing a plan into ``out``),
  ``report`` (:class:`MergeReport`).
"""

from __future__ import annotations

from streammerge.iterate import iter_merged
from streammerge.merging import merge, plan_merge
from streammerge.prepare import (
    DEFAULT_MAX_MEMORY,
    AdapterSpec,
    PathLike,
    device_name,
    merge_options,
    plan_with,
    resolve_device,
    resolve_heads_from,
)
from streammerge.report import MergeReport
from streammerge.split_merge import finalize
from streammerge.unmerging import plan_unmerge, unmerge

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "AdapterSpec",
    "MergeReport",
    "PathLike",
    "device_name",
    "finalize",
    "iter_merged",
    "merge",
    "merge_options",
    "plan_merge",
    "plan_unmerge",
    "plan_with",
    "resolve_device",
    "resolve_heads_from",
    "unmerge",
]
