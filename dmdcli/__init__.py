"""dmd: Distribution Matching Distillation (DMD, DMD2) as a command-line toolkit."""

__version__ = "0.1.0"
