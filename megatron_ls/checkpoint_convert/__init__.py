"""Checkpoint conversion: training layouts (any TP x PP x ZeRO) <-> the consolidated inference checkpoint."""
