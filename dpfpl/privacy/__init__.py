"""Differential privacy: events (:mod:`.events`), accountants (:mod:`.accountants`), the ledger
(:mod:`.ledger`), calibration (:mod:`.calibration`), releases (:mod:`.release`), secret randomness
(:mod:`.randomness`), the training mechanisms (:mod:`.dp`) and the public DP-FPL code's claimed
calibration (:mod:`.reference`)."""

from .accountants import PLD_DISCRETIZATION, PLD_MAX_EPSILON, epsilon, gaussian_epsilon, pld_epsilon, rdp_epsilon
from .calibration import calibrate, calibrate_noise_multiplier
from .events import (SAMPLINGS, batch_event, event_from_dict, event_to_dict, joint_noise_multiplier,
                     make_event)
from .ledger import PrivacyLedger
from .reference import (reference_accounted_events, reference_claimed_epsilon, reference_epsilons,
                        reference_noise_multiplier, reference_sigma)

__all__ = [
    "PLD_DISCRETIZATION", "PLD_MAX_EPSILON", "SAMPLINGS", "PrivacyLedger", "batch_event", "calibrate",
    "calibrate_noise_multiplier", "epsilon", "event_from_dict", "event_to_dict", "gaussian_epsilon",
    "joint_noise_multiplier", "make_event", "pld_epsilon", "rdp_epsilon", "reference_accounted_events",
    "reference_claimed_epsilon", "reference_epsilons", "reference_noise_multiplier", "reference_sigma",
]
