"""Where a PPO step's time goes (generation, scoring, training), and rollout throughput on the PPO policy's shape.

The code lives in ``finegrain.bench.ppo_breakdown``; this script runs it with every size as an option
(``--help`` lists them). ``finegrain bench ppo_breakdown`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.ppo_breakdown import main

if __name__ == "__main__":
    sys.exit(main())
