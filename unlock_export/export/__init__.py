"""Export: fold, verify, model card, GGUF files, Hub push, inspect."""
