"""The CLI's commands, one file each: ``HELP``, ``setup(parser)`` and ``run(args) -> exit code``.
``gradtune.cli`` lists them in one table."""
