"""Contrastive towers (CoCa's): image and text latents in one space, for /v1/embeddings, /v1/classify
and the router's stage 1. A family that has them gives a `ContrastiveTowers`; zero-shot scoring is
written once, here (`ZeroShot`)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from vision.encoders.base import ImageFeatures


class ContrastiveTowers(Protocol):
    embed_dim: int  # the latents' width
    text_context: int  # tokens the text tower reads, start and end tokens included
    logit_scale: float  # exp of the learned temperature
    label_prompt: str  # "{label}" -> the text a zero-shot label is encoded as

    def text_ids(self, text: str) -> list[int]:
        """The token ids the text tower reads for `text`, start and end tokens included."""

    def text_latent(self, ids: list[int]) -> torch.Tensor:
        """[embed_dim], L2-normalised."""


def image_latent(features: ImageFeatures) -> torch.Tensor:
    """An image's contrastive latent, L2-normalised: the vision tower's pooled output."""
    return F.normalize(features.pooled.float(), dim=-1)


class ZeroShot:
    """Softmax over labels of the scaled cosine similarity with the image. The latents of a fixed label
    set are computed once (re-encoding every label per request would cost as much as a decode); other
    labels are encoded per call."""

    def __init__(self, towers: ContrastiveTowers, labels: list[str] = ()) -> None:
        self.towers = towers
        self.labels = list(dict.fromkeys(labels))  # order kept, duplicates dropped
        self._latents = self.latents(self.labels) if self.labels else None

    def latents(self, labels: list[str]) -> torch.Tensor:
        """Normalized text latents of the labels' prompts, each encoded unpadded (open_clip's CLS mask
        is off by one under padding)."""
        t = self.towers
        return torch.stack([t.text_latent(t.text_ids(t.label_prompt.format(label=label))) for label in labels])

    @torch.inference_mode()
    def classify(self, features: ImageFeatures, labels: list[str] | None = None) -> list[tuple[str, float]]:
        """(label, probability) best first; `labels` None: the fixed set."""
        if labels is None:
            labels, latents = self.labels, self._latents
        else:
            latents = self.latents(labels)
        if latents is None:
            return []
        scores = (self.towers.logit_scale * latents @ image_latent(features)).softmax(-1).tolist()
        return sorted(zip(labels, scores), key=lambda x: -x[1])
