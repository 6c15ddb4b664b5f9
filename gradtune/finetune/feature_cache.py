"""Pooled features of a frozen body, computed once per text and reused across epochs.

Why: with ``method: head`` nothing in the body trains, so its forward is the whole cost of a step
(no backward), and it repeats for every text every epoch. Run in eval mode (no dropout, as a
linear probe reads features) the body is a fixed function of the text's tokens, so each text's
pooled (H,) feature is computed once, without autograd, and later epochs (and evaluation, which
is in eval mode anyway) read it back: one forward per distinct text for the whole run.

Key: a row's real tokens (ids where the attention mask is 1), so a text padded to different
lengths in different batches is one entry. The cache empties itself when any body parameter is
changed in place (``Tensor._version``: loading a checkpoint, unfreezing and an optimizer step
all count), the autocast dtype or the device differs. Held in float32 up to ``max_bytes``; rows past it
are computed every time, as without the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MAX_BYTES = 512 << 20  # 512 MB of features: 350k texts at hidden size 384


class FeatureCache:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.rows: dict[bytes, torch.Tensor] = {}  # real tokens -> (H,) float32
        self.nbytes = 0
        self.token: tuple = ()

    def clear(self) -> None:
        self.rows, self.nbytes = {}, 0

    def _check(self, body: nn.Module) -> None:
        token = (
            tuple(p._version for p in body.parameters()),
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
            next(body.parameters()).device,
        )
        if token != self.token:
            self.clear()
            self.token = token

    def features(
        self,
        body: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """(B, H) float32 pooled features of the batch; ``compute(ids, mask)`` -> (b, H) runs the
        body (eval mode, no autograd) on the rows not cached yet, as one smaller batch."""
        self._check(body)
        ids, mask = input_ids.cpu(), attention_mask.cpu()
        keys = [ids[i][mask[i].bool()].numpy().tobytes() for i in range(ids.shape[0])]
        # A batch that repeats a text (the evaluation chunk's memory probe: one text, then two copies of it) runs the
        # body on every row, so that what it measures is the body's forward, not a lookup.
        repeats = len(set(keys)) < len(keys)
        missing = [i for i, key in enumerate(keys) if repeats or key not in self.rows]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            sub = torch.tensor(missing, device=input_ids.device)
            was = body.training
            body.eval()
            try:
                with torch.no_grad():
                    got = compute(input_ids.index_select(0, sub), attention_mask.index_select(0, sub)).float()
            finally:
                body.train(was)
            for j, i in enumerate(missing):
                fresh[i] = got[j]
                if keys[i] not in self.rows and self.nbytes + got[j].nbytes <= self.max_bytes:
                    self.rows[keys[i]] = got[j].clone()  # its own storage: the batch's can be freed
                    self.nbytes += got[j].nbytes
        return torch.stack([fresh[i] if i in fresh else self.rows[k] for i, k in enumerate(keys)])
