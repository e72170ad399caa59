"""Peak memory of DPO training with a separate frozen reference model vs LoRA with the reference = the policy with

The code lives in ``finegrain.bench.lora_memory``; this script runs it with every size as an option
(``--help`` lists them). ``finegrain bench lora_memory`` runs it with the suite's sizes and writes its JSON result.
"""

import sys

from finegrain.bench.lora_memory import main

if __name__ == "__main__":
    sys.exit(main())
