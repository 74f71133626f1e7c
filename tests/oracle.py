"""The reference computations our decoder is held to: open_clip's own CoCa forward.

open_clip 3.3's `CoCa.generate` cannot run beside transformers 5 (it imports `BeamSearchScorer`,
which transformers 5 removed, and then asserts "Please install transformers"). With
`generation_type="top_k", top_k=1` it computes exactly the loop below: the full reference forward
over the sequence so far, the minimum-length rule on the end token, then argmax; the last of
`seq_len` tokens is forced to the end token. So this loop is the oracle for `generate`.
"""

from __future__ import annotations

import open_clip
import torch


@torch.inference_mode()
def open_clip_greedy(model: open_clip.CoCa, image: torch.Tensor, text: torch.Tensor, *, eos_id: int,
                     seq_len: int = 30, min_seq_len: int = 5) -> torch.Tensor:
    """open_clip `CoCa.generate(image, text, seq_len, generation_type="top_k", top_k=1)` for one
    image. Returns the whole sequence, prompt included, like generate does."""
    image_latent, image_embs = model._encode_image(image)
    out = text
    while True:
        logits = model(image, out, image_latent=image_latent, image_embs=image_embs,
                       output_labels=False)["logits"][:, -1]
        if out[0, -1] == eos_id:
            break
        if out.shape[1] < min_seq_len:
            logits[:, eos_id] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        if out.shape[1] + 1 == seq_len:
            token = torch.full_like(token, eos_id)
        out = torch.cat([out, token], dim=1)
        if out.shape[1] >= seq_len:
            break
    return out
