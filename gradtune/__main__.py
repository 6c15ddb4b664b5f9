"""``python -m gradtune``: the same entry point as the ``gradtune`` command (gradtune.cli.main).

Ctrl-C while gradtune.cli is being imported is handled there (exit 130, one line); the guard
here catches the few milliseconds before its handler is installed.
"""

import sys

try:
    from gradtune.cli import entry
except KeyboardInterrupt:
    print("gradtune: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(entry())
