"""`python -m sku …`, which is what `accelerate launch -m sku …` runs on every process."""

import sys

from sku.cli import main

sys.exit(main())
