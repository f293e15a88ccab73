"""`python -m labelsmooth_ext demo`: label smoothing's effect on calibration under noisy labels,
and the speed of labelsmooth_ext.cross_entropy against PyTorch's own, written to one folder."""

from labelsmooth_ext.demo.cli import main

__all__ = ["main"]
