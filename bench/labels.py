"""Names, order and colours of what the reports show: methods, series and privacy levels.

A *series* is what a table column or plot line shows: the method, or ``method+ref`` for runs in
reference mode (same method, a different privacy mechanism: never averaged with honest runs).
A *privacy level* is ``none`` (raw, non-private), ``clip`` (privacy mode dp with both noise
multipliers 0: the private cells' clipping, sampling and learning rate without noise; eps is
infinite) or a target eps written with ``%g`` ("4", "0.25").
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

METHOD_ORDER = ["zeroshot", "local", "promptfl", "fedprompt", "fedotp", "fedpgp", "dpfpl-nores", "dpfpl"]
METHOD_LABELS = {"zeroshot": "Zero-shot", "local": "Local only", "promptfl": "PromptFL", "fedprompt": "FedPrompt",
                 "fedotp": "FedOTP", "fedpgp": "FedPGP", "dpfpl-nores": "DP-FPL w/o res.", "dpfpl": "DP-FPL"}
METHOD_COLORS = {"zeroshot": "0.45", "local": "C1", "promptfl": "C0", "fedprompt": "C9", "fedotp": "C4",
                 "fedpgp": "C5", "dpfpl-nores": "C6", "dpfpl": "C3"}
#: Suffix of a series run in reference mode (the public code's calibration; its eps is a claim).
REF_SUFFIX = "+ref"
#: The method every other series is tested against in the significance columns.
PROPOSED = "dpfpl"

NONE, CLIP = "none", "clip"
LEVEL_LABELS = {NONE: "none", CLIP: "clipped, no noise"}


def series_of(method: str, privacy: Optional[str]) -> str:
    return method + (REF_SUFFIX if privacy == "reference" else "")


def base_method(s: str) -> str:
    return s[:-len(REF_SUFFIX)] if s.endswith(REF_SUFFIX) else s


def label(series: str) -> str:
    base = METHOD_LABELS.get(base_method(series), base_method(series))
    return base + (" (ref. mode)" if series.endswith(REF_SUFFIX) else "")


def color(series: str, i: int = 0) -> str:
    """Plot colour: the method's, black for a reference-mode series."""
    if series.endswith(REF_SUFFIX):
        return "k"
    return METHOD_COLORS.get(series, f"C{i % 10}")


def linestyle(series: str) -> str:
    return "--" if series == "dpfpl-nores" else (":" if series.endswith(REF_SUFFIX) else "-")


def series_order(series: Iterable[str]) -> list[str]:
    """Paper order, each reference-mode series right after its method, unknown ones sorted last."""
    ms = list(dict.fromkeys(series))
    known = [m for b in METHOD_ORDER for m in (b, b + REF_SUFFIX) if m in ms]
    return known + sorted(m for m in ms if m not in known)


def level_of(epsilon: Any) -> str:
    """Privacy level of a cell's eps axis value: None -> 'none', 'clip' or inf -> 'clip', x -> '%g'."""
    if epsilon is None or (isinstance(epsilon, float) and math.isnan(epsilon)) or epsilon == "":
        return NONE
    if epsilon == CLIP or (isinstance(epsilon, (int, float)) and math.isinf(epsilon)):
        return CLIP
    return f"{float(epsilon):g}"


def level_eps(level: str) -> Optional[float]:
    """Target eps of a level: None (non-private), inf (clipped, no noise) or the number."""
    return None if level == NONE else (math.inf if level == CLIP else float(level))


def level_sort_key(level: str) -> tuple[int, float]:
    """none, then clipped-no-noise, then eps from the largest (least private) down."""
    if level == NONE:
        return (0, 0.0)
    if level == CLIP:
        return (1, 0.0)
    return (2, -float(level))


def level_label(level: str) -> str:
    return LEVEL_LABELS.get(level, level)
