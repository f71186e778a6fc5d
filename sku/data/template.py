"""The prompt template of the official SKU code: training rows, generation and perplexity all
format prompts with it."""

PROMPT_TEMPLATE = "### Question: {prompt}\n ### Answer:"  # the response follows after a space
