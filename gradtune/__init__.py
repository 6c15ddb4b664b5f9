"""gradtune: one gradient-descent engine, from linear regression to fine-tuning large models.

The package is layered (ARCHITECTURE.md): runtime -> config -> data / models / optim / telemetry
-> objectives -> finetune -> jobs -> state -> loop -> outputs -> train -> commands -> cli.
Importing ``gradtune`` itself loads nothing; import what you use, e.g. ``gradtune.train.train``
or ``gradtune.loop.fit.fit``.
"""

__version__ = "0.1.0"
