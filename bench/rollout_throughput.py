"""Rollout throughput: finegrain's sampler (:func:`finegrain.rl.rollout.sample_rollouts`) vs ``model.generate``.

The code lives in ``finegrain.bench.rollout_throughput``; this script runs it with every size as an option
(``--help`` lists them). ``finegrain bench rollout_throughput`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.rollout_throughput import main

if __name__ == "__main__":
    sys.exit(main())
