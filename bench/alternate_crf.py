"""The dense CRF on one CPU thread, timed alternately against pydensecrf2.

    python -m bench.alternate_crf --rounds 60 --params psa_softmax

The pytest benchmarks time five rounds of one library, then five of the other; on a
noisy machine a slow spell can fall on one side only. Here every round times one call
of each library back to back (the benchmark's photo, inputs and calls: lattices and
10 mean-field steps included), so slow spells hit both; the ratio of the medians is
the figure to compare with the 5x target.
"""

import argparse
import time

import numpy as np
import pydensecrf.densecrf as pydensecrf
import torch

import wsss_fast.crf as wsss_crf
from tests.crf_inputs import PARAMETER_SETS, load_photo, run_densecrf2d, synthetic_softmax


def alternate(rounds: int, params_name: str, labels: int) -> dict[str, np.ndarray]:
    """Milliseconds per call, float64 (rounds,), for "pydensecrf2" and "wsss_fast"."""
    params = PARAMETER_SETS[params_name]
    image = load_photo("coffee")
    unary = params.make_unary(synthetic_softmax(image, labels, seed=1))
    libraries = {"pydensecrf2": pydensecrf, "wsss_fast": wsss_crf}
    for module in libraries.values():  # warm-up: pools, caches, lazy imports
        run_densecrf2d(module, image, unary, params)
    times = {name: np.empty(rounds) for name in libraries}
    for index in range(rounds):
        for name, module in libraries.items():
            start = time.perf_counter()
            run_densecrf2d(module, image, unary, params)
            times[name][index] = 1000 * (time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternations (default 40)")
    parser.add_argument("--params", default="psa_softmax", choices=sorted(PARAMETER_SETS))
    parser.add_argument("--labels", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    times = alternate(args.rounds, args.params, args.labels)
    for name, values in times.items():
        low, quarter, middle = np.percentile(values, [0, 25, 50])
        print(f"{name:12s} min {low:7.1f}  q25 {quarter:7.1f}  median {middle:7.1f} ms")
    ours, theirs = times["wsss_fast"], times["pydensecrf2"]
    print(
        f"pydensecrf2 / wsss_fast: {np.median(theirs) / np.median(ours):.2f}x by medians, "
        f"{theirs.min() / ours.min():.2f}x by minima ({args.rounds} rounds, "
        f"{args.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
