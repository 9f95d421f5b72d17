"""Grammar masks for the device sampler: each step's token bitmask, written on the host by the requests'
grammar matchers into a fixed buffer and copied to the device.

A request with a grammar (`SamplingParams.guide`; `rdnac.serve.structured` builds them on xgrammar) has a
matcher per sequence. Each step, every sampled row gets a row of a [B, ceil(V / 32)] int32 bitmask in
xgrammar's layout (bit j of word w: token 32 w + j may be drawn): a matcher writes its own row, a row
without a grammar is all ones. The sampler applies the whole batch's mask on the device as one masked op
(`sampling.apply_token_bitmask`), eagerly or inside the captured decode graphs (graphs.py).

The buffers are fixed per batch bucket (powers of two), the host one pinned on a GPU so the copy is
asynchronous: the host work per token is the grammar library's alone (filling its row, then advancing the
matcher by the drawn token, which the engine has on the host anyway).
"""

from __future__ import annotations

import torch


class TokenBitmasks:
    def __init__(self, vocab_size: int, device: str | torch.device):
        self.num_words = (vocab_size + 31) // 32
        self.device = torch.device(device)
        # per bucket: (host buffer, device buffer, event after the last copy out of the host buffer)
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = {}

    def _buffer(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        if bucket not in self._buffers:
            is_gpu = self.device.type == "cuda"
            host = torch.empty(bucket, self.num_words, dtype=torch.int32, pin_memory=is_gpu)
            device = torch.empty_like(host, device=self.device) if is_gpu else host
            self._buffers[bucket] = host, device, torch.cuda.Event() if is_gpu else None
        return self._buffers[bucket]

    def fill(self, matchers: list) -> torch.Tensor:
        """The step's mask, [B, W] int32 on the device: row i written by matchers[i] (`fill_bitmask(bitmask,
        row)`), all ones where it is None. A view of the bucket's buffer, valid until the next fill."""
        num_rows = len(matchers)
        host, device, copied = self._buffer(1 << max(num_rows - 1, 0).bit_length())
        if copied is not None:
            copied.synchronize()  # the last step's copy out of this pinned buffer has run
        host[:num_rows].fill_(-1)
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                matcher.fill_bitmask(host, row)
        if device is host:
            return host[:num_rows]
        device[:num_rows].copy_(host[:num_rows], non_blocking=True)  # pinned: no stream sync
        copied.record()
        return device[:num_rows]
