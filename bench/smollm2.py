"""Every speed and memory benchmark on a real model (SmolLM2-135M-Instruct, or its architecture from a config).

The code lives in ``finegrain.bench.smollm2``; this script runs it with every size as an option (``--help`` lists
them). ``finegrain bench smollm2`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.smollm2 import main

if __name__ == "__main__":
    sys.exit(main())
