"""Robust split inference: importance scores, replication policies, evaluation under every failure set."""

from edgesplit.robust.evaluate import Metric, Row, Samples, Study, prepare
from edgesplit.robust.importance import Importance, importance
from edgesplit.robust.policies import Policy, replicas

__all__ = ["Importance", "Metric", "Policy", "Row", "Samples", "Study", "importance", "prepare", "replicas"]
