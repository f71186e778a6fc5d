"""`sku demo`: the whole study on a tiny model (tiny_model) and bundled fictional data (data/),
every method and ablation through the real commands (study)."""
