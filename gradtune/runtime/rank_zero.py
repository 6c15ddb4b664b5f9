"""Work done once, on rank 0, that every rank then waits for: a file written once under torchrun.

If rank 0 fails, every rank raises, so no rank reads a checkpoint that was never written."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from gradtune.runtime.distributed import active, is_main
from gradtune.runtime.errors import GradtuneError


def on_main(fn: Any, *args: Any) -> Any:
    """Run ``fn`` on rank 0 only (a file written once), then make every rank wait for it; if it
    failed, every rank raises, so no rank reads a checkpoint that was never written. A
    GradtuneError is raised as itself everywhere (a WriteError still exits 74 on every rank)."""
    if not active():
        return fn(*args)
    result, error, mine = None, None, None
    if is_main():
        try:
            result = fn(*args)
        except Exception as e:  # re-raised on every rank below
            if not isinstance(e, GradtuneError):
                error = (f"{type(e).__name__}: {e}", None)
            else:  # the message and exit code travel, not the object (its class may not unpickle)
                mine, error = e, (str(e), e.exit_code)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return result
    text, code = box[0]
    if code is None:
        raise RuntimeError(f"rank 0 failed while writing: {text}")
    if is_main():
        raise mine
    err = GradtuneError(text)
    err.exit_code = code
    raise err
