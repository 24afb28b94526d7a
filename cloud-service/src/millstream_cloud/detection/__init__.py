"""Anomaly detection: per-metric streaming detectors, per-device multivariate models,
calibration, explanations and the live-path engine. See docs/detection.md.

Importing the package registers every detector, so ``create(name)`` knows them all.
"""

from . import multivariate, streaming
from .base import create, register, registered
from .engine import DetectionEngine, EngineSettings

__all__ = [
    "DetectionEngine",
    "EngineSettings",
    "create",
    "multivariate",
    "register",
    "registered",
    "streaming",
]
