"""Evaluation: generate (responses), judge (harmful or not), metrics (perplexity, BLEURT),
evaluate (a run's models into metrics.json) and report (Table 1 and Figure 3)."""
