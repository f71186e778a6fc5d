"""SKU unlearning workflow: data, stage 1 training, stage 2 negation, baselines, evaluation."""
