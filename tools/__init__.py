"""smolagents tools of the defect response agent (thin: check arguments, call services/)."""

from __future__ import annotations

from tools.anomaly_scoring import AnomalyScoringTool
from tools.context import RunContext
from tools.manual_retrieval import ManualRetrievalTool
from tools.register_correction import RegisterCorrectionTool
from tools.similar_defects import SimilarDefectSearchTool

#: the analysis tools, in the order a full analysis calls them
TOOL_CLASSES = (AnomalyScoringTool, SimilarDefectSearchTool, ManualRetrievalTool)
#: tools that read the photo (offered only when the conversation has one)
IMAGE_TOOLS = ("anomaly_scoring", "similar_defect_search", "register_correction")
#: tools that write (offered only where the session may write)
WRITE_TOOLS = ("register_correction",)


def build_tools(ctx: RunContext, services, writes: bool | None = None) -> list:
    """The tools bound to one turn's context and the process's services.

    Args:
        writes: add the writing tools (default: ``ctx.writes``).

    Returns:
        ``[anomaly_scoring, similar_defect_search, manual_retrieval]`` (+ ``register_correction``).
    """
    tools = [cls(ctx, services) for cls in TOOL_CLASSES]
    if ctx.writes if writes is None else writes:
        tools.append(RegisterCorrectionTool(ctx, services))
    return tools


__all__ = ["RunContext", "build_tools", "AnomalyScoringTool", "SimilarDefectSearchTool", "ManualRetrievalTool",
           "RegisterCorrectionTool", "TOOL_CLASSES", "IMAGE_TOOLS", "WRITE_TOOLS"]
