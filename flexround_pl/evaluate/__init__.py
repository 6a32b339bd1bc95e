"""Evaluation: task metrics shared by the data modules and the evaluation loop."""

from flexround_pl.evaluate.agreement import FPAgreement
from flexround_pl.evaluate.divergence import FPDivergence
from flexround_pl.evaluate.metrics import (
    GLUE_TASKS,
    ClassificationMetrics,
    GlueTask,
    PerplexityMetrics,
    TaskMetrics,
    TopKMetrics,
)

__all__ = ["GLUE_TASKS", "ClassificationMetrics", "FPAgreement", "FPDivergence", "GlueTask", "PerplexityMetrics", "TaskMetrics", "TopKMetrics"]
