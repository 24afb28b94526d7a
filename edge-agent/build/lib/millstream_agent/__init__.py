"""Millstream edge agent: collect machine telemetry and stream it over MQTT, losing nothing."""

__version__ = "0.1.0"
