"""unlock-export's GSM8K task for lm-evaluation-harness (written by `unlock-export lm-eval-task`)."""

from unlock_export.evaluation.lmeval import load_docs, process_results  # noqa: F401
