"""unlock-export: training-free capability transfer (UNLOCK) exported as ordinary weights."""

__version__ = "0.1.0"
