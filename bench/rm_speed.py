"""Sentence-RM cost: forward + backward time per batch of the sentence RM against the sequence RM, same backbone.

The code lives in ``finegrain.bench.rm_speed``; this script runs it with every size as an option
(``--help`` lists them). ``finegrain bench rm_speed`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.rm_speed import main

if __name__ == "__main__":
    sys.exit(main())
