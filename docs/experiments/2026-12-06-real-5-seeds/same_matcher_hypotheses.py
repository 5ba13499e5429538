"""This run's hypothesis runs, same distribution matcher only (plan amendment 4).

``python same_matcher_hypotheses.py ARGS`` is ``python -m
adaptive_transfer.experiment ARGS`` with the elastic variants of the oracle,
temperature and generalist runs left out (no reading rule of amendment 3
uses them; leaving them out lets every unit run). Run it with the
experiment's commit on ``PYTHONPATH``; nothing else differs from the module.
"""

import sys

import adaptive_transfer.experiment as experiment
from adaptive_transfer.experiment import plan


def same_matcher_only(config, seed, which):
    """``plan.hypothesis_runs`` without the elastic matcher's runs."""
    return [r for r in plan.hypothesis_runs(config, seed, which) if r.arm != "elastic"]


if __name__ == "__main__":
    experiment.hypothesis_runs = same_matcher_only
    sys.exit(experiment.main(sys.argv[1:]))
