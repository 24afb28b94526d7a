"""Millstream cloud service: ingest, store, detect, alert and show factory telemetry."""

__version__ = "0.1.0"
