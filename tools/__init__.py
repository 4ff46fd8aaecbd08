"""smolagents tools of the defect response agent (thin: check arguments, call stores/)."""

from __future__ import annotations

from tools.anomaly_scoring import AnomalyScoringTool
from tools.context import RunContext
from tools.manual_retrieval import ManualRetrievalTool
from tools.similar_defects import SimilarDefectSearchTool

TOOL_CLASSES = (AnomalyScoringTool, SimilarDefectSearchTool, ManualRetrievalTool)


def build_tools(ctx: RunContext, services) -> list:
    """The three tools bound to one run context and the process's services."""
    return [cls(ctx, services) for cls in TOOL_CLASSES]


__all__ = ["RunContext", "build_tools", "AnomalyScoringTool", "SimilarDefectSearchTool", "ManualRetrievalTool"]
