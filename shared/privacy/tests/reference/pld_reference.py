#!/usr/bin/env python3
"""Reference values for the PLD accountant, from Google's `dp_accounting`.

Prints a tab-separated table that `shared/privacy/tests/pld_reference.rs` reads:

    epsilon  z  q  rounds  delta  eps      # ε of `rounds` Poisson-subsampled Gaussian rounds
    noise    eps_target  q  rounds  delta  z_pld  z_rdp   # smallest z for a target ε

ε comes from `dp_accounting.pld.PLDAccountant()` as it is by default: add-or-remove
neighbouring, pessimistic connect-the-dots discretization with interval 1e-4, each event
`PoissonSampledDpEvent(q, GaussianDpEvent(z))` composed `rounds` times (one self-composition).
The noise rows solve z with `dp_accounting.calibrate_dp_mechanism` (Brent, tolerance 1e-6)
under the PLD accountant and, for comparison, the RDP accountant with its default orders.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install dp-accounting
    /tmp/venv/bin/python shared/privacy/tests/reference/pld_reference.py \
        > shared/privacy/tests/reference/pld_reference.tsv
"""

import importlib.metadata
import sys

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

NOISE = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
SAMPLING = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5]
ROUNDS = [1, 10, 100, 1000, 5000]
DELTAS = [1e-10, 1e-7, 1e-5]

# The simulation's default private run (README): ten devices of 194 per round, 30 rounds,
# ε = 8 at δ = 1e-5; and the planning example of `aggregator privacy noise`.
NOISE_CASES = [
    (8.0, 10 / 194, 30, 1e-5),
    (2.0, 0.01, 1000, 1e-5),
    (1.0, 0.001, 5000, 1e-7),
]


def event(z, q, rounds):
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds
    )


def pld_epsilons(z, q, rounds, deltas):
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(event(z, q, rounds))
    return [acc.get_epsilon(d) for d in deltas]


def solve(make_accountant, target, q, rounds, delta):
    return dp_accounting.calibrate_dp_mechanism(
        make_accountant,
        lambda z: event(z, q, rounds),
        target,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(0.1, 50.0),
        tol=1e-6,
    )


def main():
    version = importlib.metadata.version("dp-accounting")
    print(f"# dp_accounting {version}, PLDAccountant() defaults (pessimistic, interval 1e-4)")
    print("# kind\tz\tq\trounds\tdelta\tepsilon")
    for z in NOISE:
        for q in SAMPLING:
            for t in ROUNDS:
                for d, e in zip(DELTAS, pld_epsilons(z, q, t, DELTAS)):
                    print(f"epsilon\t{z!r}\t{q!r}\t{t}\t{d!r}\t{e!r}")
                sys.stdout.flush()
    print("# kind\ttarget_epsilon\tq\trounds\tdelta\tz_pld\tz_rdp")
    for target, q, t, d in NOISE_CASES:
        z_pld = solve(pld_privacy_accountant.PLDAccountant, target, q, t, d)
        z_rdp = solve(rdp_privacy_accountant.RdpAccountant, target, q, t, d)
        print(f"noise\t{target!r}\t{q!r}\t{t}\t{d!r}\t{z_pld!r}\t{z_rdp!r}")


if __name__ == "__main__":
    main()
