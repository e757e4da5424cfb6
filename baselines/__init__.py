"""Baselines of the DP-FPL paper, each a small :class:`dpfpl.methods.Method` subclass registered in
the same registry and trained by the same engine (see ``dpfpl methods``)."""

from .methods import DPFPLNoResidual, FedOTP, FedPGP, FedPrompt, LocalOnly, PromptFL, ZeroShot

__all__ = ["PromptFL", "FedPrompt", "FedOTP", "FedPGP", "DPFPLNoResidual", "LocalOnly", "ZeroShot"]
