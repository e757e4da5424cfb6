"""Audit Flower's central-DP strategy wrappers with fixed clipping (flwr 1.42, ``flwr.server.strategy``).

What is run is Flower itself: ``DifferentialPrivacyServerSideFixedClipping`` (the server clips each
client's update, FedAvg averages, Gaussian noise of std ``noise_multiplier * clipping_norm /
num_sampled_clients`` is added to the average: ``flwr.supercore.differential_privacy``) and
``DifferentialPrivacyClientSideFixedClipping`` (the same noise; each client's update is clipped by
the client mod ``flwr.client.mod.fixedclipping_mod``, which reads the clipping norm the wrapper
put into the FitIns config). Each round calls the wrapper's real ``configure_fit`` (over a
``SimpleClientManager`` of stand-in client proxies; ``FedAvg(fraction_fit=1)``) and
``aggregate_fit`` on constructed ``FitRes``; client side, every reply passes through the real mod
(a Flower ``Message`` in, a reply ``Message`` out).

Worst case, client level (a canary client): n clients are sampled every round (q = 1); in the
canary world client k's update is ``1000 C e_k`` (clipped to ``C e_k``), in the other world every
update is zero (the canary client replaced by one with nothing to contribute: Flower's
"add-or-remove-one" with a fixed number of sampled clients, i.e. the zero-out relation). The mean
moves by ``C / n`` on coordinate k and the noise std is ``sigma C / n``, so in units of C/n the
released coordinate is ``1{canary} + N(0, sigma^2)``: one Gaussian per round, T rounds compose to
one Gaussian of mu = sqrt(T)/sigma. Coordinate k sees only canary k, Flower's noise is i.i.d. per
coordinate (``np.random.normal``, seeded here from the audit's rng), so one round serves n trials.
(Every client also moves one unobserved coordinate by :data:`PAD` C: Flower's clipping divides by
the update's norm and raises ZeroDivisionError on an all-zero update.)
In the other world the update vectors are longer (``out_coords`` coordinates, still n clients):
every coordinate is an independent draw of that world's output, at a fraction of the cost.

Flower samples a fixed number of clients (no Poisson sampling), so no amplification by sampling is
claimed: the claim is Flower's own ``flwr.serverapp.RdpAccountant`` (``PrivacyConfig(sampling_method=
"no-amplification", neighboring_relation="add-or-remove-one")``, one ``GaussianPrivacyEvent`` per
round), which the message-API wrappers (``flwr.serverapp.strategy``) use; the legacy wrappers
audited here report no eps themselves. Beside it, dp-accounting's exact Gaussian eps.

``canary_weight`` != 1 (with ``fillers`` zero clients of weight 1): the canaries report
``num_examples = canary_weight``, which FedAvg's weighted mean uses: their weight in the mean is
then ``w / (sum of weights)``, not the ``1 / n`` the noise is calibrated for.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import numpy as np

from dpfpl.errors import ConfigError

from ..mechanism import ReleaseFn, accounted_epsilon, audit_mechanism, gaussian_mixture_llr
from . import ExternalAudit, row_from

__all__ = ["BIG", "PAD", "flower_round_runner", "flower_release", "flower_epsilon", "calibrate_flower", "audit_flower"]

BIG = 1000.0  # canary norm / C
#: Every client also moves one last, unobserved coordinate by PAD * C: Flower's clipping
#: (``clip_inputs_inplace``: ``clipping_norm / input_norm``) raises ZeroDivisionError on an all-zero
#: update, so "zero update" is zero on every observed coordinate (the other world's clients, fillers).
PAD = 1e-3
SIDES = ("server", "client")


def _proxy_class():
    from flwr.server.client_proxy import ClientProxy

    class StandInProxy(ClientProxy):
        """A registered client the wrapper can sample; the audit answers for it (never called)."""

        def _no(self, *a: Any, **k: Any) -> Any:
            raise NotImplementedError("stand-in client: the audit builds its FitRes")

        get_properties = get_parameters = fit = evaluate = reconnect = _no

    return StandInProxy


def flower_round_runner(side: str, noise_multiplier: float, clipping_norm: float, clients: int):
    """A wrapper (``side`` = "server" | "client") over FedAvg for ``clients`` sampled clients and
    ``run(updates, weights, rounds, seed) -> (obs (D, rounds), checks)``: ``rounds`` real rounds in
    which client i's update is ``updates[i]`` (D,) and its num_examples ``weights[i]``; obs =
    (new global - old global) * clients / clipping_norm (units of C/n)."""
    from flwr.app.metadata import Metadata
    from flwr.client.mod import fixedclipping_mod
    from flwr.common import (Code, Context, FitRes, Message, MessageType, RecordDict, Status,
                             ndarrays_to_parameters, parameters_to_ndarrays)
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                      DifferentialPrivacyServerSideFixedClipping, FedAvg)

    if side not in SIDES:
        raise ConfigError(f"flower audit: side must be one of {SIDES}, got {side!r}")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # one INFO line per client per round otherwise
    Proxy = _proxy_class()

    def run(updates: np.ndarray, weights: np.ndarray, rounds: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        n, D = updates.shape
        if n != clients:
            raise ConfigError(f"flower audit: {n} updates for {clients} clients")
        cm = SimpleClientManager()
        proxies = [Proxy(str(i)) for i in range(n)]
        for p in proxies:
            cm.register(p)
        W = DifferentialPrivacyServerSideFixedClipping if side == "server" else DifferentialPrivacyClientSideFixedClipping
        strategy = W(FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n),
                     noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, num_sampled_clients=n)
        params = ndarrays_to_parameters([np.zeros(D)])
        obs, sampled, state = [], [], np.random.get_state()
        np.random.seed(seed)  # Flower's noise: np.random.normal of the global numpy RNG
        try:
            for r in range(1, rounds + 1):
                ins = strategy.configure_fit(r, params, cm)
                sampled.append(len(ins))
                g = parameters_to_ndarrays(params)[0]
                results = []
                for proxy, fit_ins in ins:
                    i = int(proxy.cid)
                    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([g + updates[i]]), int(weights[i]), {})
                    if side == "client":  # the reply goes through the client mod, as in a ClientApp
                        msg = Message(compat.fitins_to_recorddict(fit_ins, keep_input=True), metadata=Metadata(
                            run_id=0, message_id=f"{r}.{i}", src_node_id=0, dst_node_id=i + 1, reply_to_message_id="",
                            group_id=str(r), created_at=0.0, ttl=3600.0, message_type=MessageType.TRAIN))
                        reply = fixedclipping_mod(msg, Context(0, i + 1, {}, RecordDict(), {}),
                                                  lambda m, c, res=res: Message(
                                                      compat.fitres_to_recorddict(res, keep_input=True), reply_to=m))
                        res = compat.recorddict_to_fitres(reply.content, keep_input=False)
                    results.append((proxy, res))
                params, _ = strategy.aggregate_fit(r, results, [])
                obs.append((parameters_to_ndarrays(params)[0] - g) * n / clipping_norm)  # (D,)
        finally:
            np.random.set_state(state)
        return np.stack(obs, 1), {"sampled_per_round": sorted(set(sampled)), "wrapper": repr(strategy)}

    return run


def flower_release(side: str, noise_multiplier: float, rounds: int, *, clipping_norm: float = 1.0,
                   clients: int = 256, out_coords: Optional[int] = None, canary_weight: int = 1, fillers: int = 0,
                   record: Optional[list] = None) -> ReleaseFn:
    """Release function (trials, T=rounds, P=1) of the wrapper on the worst case above.

    Canary world: ``clients - fillers`` canary clients, canary k's update ``1000 C e_k`` and
    num_examples ``canary_weight``; ``fillers`` clients of zero update and weight 1. Other world:
    every update zero (canaries keep their weight), ``out_coords`` coordinates (default 16 x clients)."""
    canaries = clients - fillers
    if canaries < 1:
        raise ConfigError("flower audit: need at least one canary client")
    out_coords = out_coords or 16 * clients
    run = flower_round_runner(side, noise_multiplier, clipping_norm, clients)
    weights = np.r_[np.full(canaries, canary_weight), np.ones(fillers)].astype(int)

    def release(neighbour: bool, trials: int, rng: np.random.Generator) -> np.ndarray:
        per = canaries if neighbour else out_coords
        blocks = []
        for _ in range(math.ceil(trials / per)):
            upd = np.zeros((clients, per + 1))  # + one unobserved coordinate (see PAD)
            upd[:, -1] = PAD * clipping_norm
            if neighbour:
                upd[np.arange(canaries), np.arange(canaries)] = BIG * clipping_norm
            o, chk = run(upd, weights, rounds, int(rng.integers(2 ** 31)))
            blocks.append(o[:-1])
            if record is not None:
                record.append({"neighbour": neighbour, **chk})
        return np.concatenate(blocks)[:trials, :, None]  # (trials, T, 1)

    return release


def flower_epsilon(noise_multiplier: float, rounds: int, clients: int, delta: float) -> float:
    """Flower's own eps: ``flwr.serverapp.RdpAccountant`` (no amplification, add-or-remove-one) after
    ``rounds`` x ``GaussianPrivacyEvent(noise_multiplier, sample_size=population_size=clients)``."""
    from flwr.serverapp import GaussianPrivacyEvent, PrivacyConfig, RdpAccountant
    from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

    acc = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=clients,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=clients,
                                     population_size=clients), rounds)
    return float(acc.get_epsilon(delta))


def calibrate_flower(eps: float, delta: float, rounds: int) -> float:
    """Noise multiplier with eps(delta) = ``eps`` for ``rounds`` Gaussians by dp-accounting's RDP (the
    backend of Flower's accountant; Flower has no calibration function)."""
    from dp_accounting import dp_event

    from dpfpl.privacy.calibration import calibrate

    return float(calibrate(lambda x: [(dp_event.GaussianDpEvent(x), rounds)], eps, delta, "rdp", rel_tol=1e-4))


def audit_flower(side: str, eps: float, trials: int, *, rounds: int = 4, delta: float = 1e-5, clients: int = 256,
                 noise_scale: float = 1.0, canary_weight: int = 1, fillers: int = 0, confidence: float = 0.95,
                 seed: int = 0, command: str = "") -> ExternalAudit:
    """Audit the ``side`` wrapper with sigma calibrated to ``eps`` against Flower's accountant's eps.
    ``noise_scale`` != 1 plants a fault (the wrapper gets ``noise_scale x`` the claimed sigma)."""
    from dp_accounting import dp_event

    t0 = time.perf_counter()
    sigma = calibrate_flower(eps, delta, rounds)
    claimed = flower_epsilon(sigma, rounds, clients, delta)
    record: list[dict[str, Any]] = []
    rel = flower_release(side, sigma * noise_scale, rounds, clients=clients, canary_weight=canary_weight,
                         fillers=fillers, record=record)
    res = audit_mechanism(rel, gaussian_mixture_llr([1.0], [0.0], [sigma], 1.0), delta, trials, claimed_eps=claimed,
                          confidence=confidence, seed=seed)
    beside = {"dp-accounting exact gaussian": accounted_epsilon([(dp_event.GaussianDpEvent(sigma), rounds)], delta,
                                                                "pld")}
    checks = {"runs": len(record), "sampled_per_round": sorted({s for r in record for s in r["sampled_per_round"]}),
              "wrapper": record[0]["wrapper"] if record else None}
    settings = {"wrapper": f"flwr.server.strategy.DifferentialPrivacy{side.capitalize()}SideFixedClipping",
                "inner": "FedAvg(fraction_fit=1.0)", "noise_multiplier": sigma,
                "noise_multiplier_run": sigma * noise_scale, "clipping_norm": 1.0, "num_sampled_clients": clients,
                "rounds": rounds, "client_sampling_rate": 1.0, "canary_norm": BIG, "canary_num_examples": canary_weight,
                "filler_clients": fillers, "relation": "zero-out (add-or-remove-one, fixed n)", "seed": seed}
    if side == "client":
        settings["client_mod"] = "flwr.client.mod.fixedclipping_mod"
    name = f"flower-{side}" + ("" if canary_weight == 1 else f"-weighted{canary_weight}")
    return row_from(name, eps, "flower RdpAccountant (no-amplification, add-or-remove-one)", res,
                    eps_beside=beside, settings=settings, checks=checks, seconds=time.perf_counter() - t0,
                    command=command)
