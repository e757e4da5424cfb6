"""dpfpl: trustworthy differentially private federated prompt learning on CLIP (DP-FPL, ICLR 2025)."""

__version__ = "0.1.0"
