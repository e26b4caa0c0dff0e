"""Search: the data a candidate is scored on, the evaluators that score it, and the Optuna loop."""
