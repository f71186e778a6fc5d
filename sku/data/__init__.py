"""Data: readers (files and hub ids to pairs), the prompt template, encoding (tokens, answer
positions, padding) and splits (held-out evaluation prompts, the per-step row schedule)."""
