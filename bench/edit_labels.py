"""Edit-label throughput: :func:`finegrain.data.alignment.label_revisions` on synthetic revision pairs, against the

The code lives in ``finegrain.bench.edit_labels``; this script runs it with every size as an option
(``--help`` lists them). ``finegrain bench edit_labels`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.edit_labels import main

if __name__ == "__main__":
    sys.exit(main())
