"""gradtune: one gradient-descent engine, from linear regression to fine-tuning large models.

Imports stay light: submodules are imported where used (``gradtune.optim``, ``gradtune.train``...).
"""

__version__ = "0.1.0"
