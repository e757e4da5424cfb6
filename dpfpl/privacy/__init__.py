"""Differential privacy: events, RDP/PLD accounting, the per-client ledger, calibration, and the
public DP-FPL code's (claimed) reference calibration. See :mod:`dpfpl.privacy.accounting`."""

from .accounting import (
    PLD_DISCRETIZATION,
    SAMPLINGS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    calibrate_split,
    epsilon,
    event_from_dict,
    event_to_dict,
    make_event,
    pld_epsilon,
    rdp_epsilon,
    reference_accounted_events,
    reference_claimed_epsilon,
    reference_epsilons,
    reference_noise_multiplier,
    reference_sigma,
)

__all__ = [
    "PLD_DISCRETIZATION", "SAMPLINGS", "PrivacyLedger", "calibrate_noise_multiplier",
    "calibrate_split", "epsilon", "event_from_dict", "event_to_dict", "make_event", "pld_epsilon",
    "rdp_epsilon", "reference_accounted_events", "reference_claimed_epsilon", "reference_epsilons",
    "reference_noise_multiplier", "reference_sigma",
]
