"""Evaluation harness: NAB and SKAB scorers, the fault simulator and the ``eval`` CLI."""
