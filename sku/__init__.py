"""SKU unlearning workflow: data, stage 1 training, stage 2 negation, baselines, evaluation.

    import sku
    final = sku.unlearn("sku", "meta-llama/Llama-2-7b-hf", "PKU-Alignment/PKU-SafeRLHF",
                        "truthfulqa/truthful_qa", "runs/sku-7b", config="llama2-7b")
    metrics = sku.evaluate("runs/sku-7b", judge="keyword", steps=True)
    sku.METHODS["sku"].terms  # a method is loss weights over kinds of rows

Bad input raises SkuError with a one-line message naming the file or setting.
"""

from sku.api import evaluate, unlearn
from sku.errors import SkuError
from sku.train.methods import METHODS

__all__ = ["METHODS", "SkuError", "evaluate", "unlearn"]
