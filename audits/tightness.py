"""Tightness of the mechanism audit on DP-FPL's joint mechanism (two equal parts, local client-noised,
global server-noised, one Poisson batch), calibrated by PLD to eps at delta 1e-5.
Usage: python -m audits.tightness Q T TRIALS EPS  (one JSON line; results/audits/mechanism_tightness.jsonl
holds the lines of eps 4/2/1 x (q, T) in (0.5, 16), (0.1, 16), (0.1, 128) at 1e6 trials)."""
import time, sys, math, json
from dpfpl.privacy.release import BatchMechanism, GaussianRelease
from dpfpl.privacy.calibration import calibrate
from dpfpl.privacy.events import batch_event
from audits.mechanism_run import audit_batch_mechanism
q, T, trials, eps = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = calibrate(lambda x: [(batch_event([x*math.sqrt(2), x*math.sqrt(2)], q, "poisson"), T)], eps, 1e-5, "pld")
nm = s*math.sqrt(2)
mech = BatchMechanism((GaussianRelease("local", nm, 1.0, 1.0), GaussianRelease("global", nm, 1.0, 1.0, noise_at="server")), q, "poisson")
t = time.time()
r = audit_batch_mechanism(mech, T, 1e-5, trials, claimed_eps=eps, accountant="pld")
print(json.dumps({"q": q, "T": T, "trials": trials, "eps_accounted": eps, "nm_each_part": nm, "lb": r.eps_lower_bound,
                  "ratio": r.eps_lower_bound/eps, "estimate": r.eps_estimate, "seconds_audit": round(time.time()-t,1)}))
