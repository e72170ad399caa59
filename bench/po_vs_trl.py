"""Step time of ``finegrain po`` against TRL's ``DPOTrainer``, and of TDPO2 and precomputed-reference DPO against DPO.

The code lives in ``finegrain.bench.po_vs_trl``; this script runs it with every size as an option
(``--help`` lists them). ``finegrain bench po_vs_trl`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.po_vs_trl import main

if __name__ == "__main__":
    sys.exit(main())
