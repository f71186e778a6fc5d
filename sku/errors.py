class SkuError(Exception):
    """Bad input or a failed run. The CLI prints the message as one line: `sku: error: …`."""
