"""Peak memory of TDPO's per-token statistics: chunked from hidden states vs full logits of both models.

The code lives in ``finegrain.bench.tdpo_memory``; this script runs it with every size as an option
(``--help`` lists them). ``finegrain bench tdpo_memory`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.tdpo_memory import main

if __name__ == "__main__":
    sys.exit(main())
