"""The UNLOCK method: capture, key, alignment, vectors, steering hooks."""
