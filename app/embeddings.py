"""Contrastive embeddings and zero-shot classification from the loaded model's two towers.

Images: the vision tower's pooled output (`runtime.encode_images(...)[i].pooled`), L2-normalised.
Text: the text tower's `encode_text` on `[sot, *tokens, eot]`, one input at a time and unpadded, as
`ModelRuntime.label_latents` does (open_clip's CLS mask is off by one under padding). Both land in one
space: the dot product of an image and a text embedding is their cosine similarity.

Images are decoded and encoded one at a time, so a request with many images holds at most one decoded
image (a PNG of a few KB can decode to the full pixel cap). The work runs in a worker thread; past the
deadline the request gets 504 and the worker stops before its next input.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from anyio import to_thread
from PIL import Image

from app.errors import APIError
from app.runtime import ModelRuntime
from app.schemas import (Classification, ClassifyRequest, Embedding, EmbeddingList, EmbeddingRequest,
                         EmbeddingUsage, ImagePart, LabelScore, TextPart)
from app.settings import Settings
from vision.intake import ImageError, load_image

T = TypeVar("T")


@dataclass(frozen=True)
class TextTokens:
    ids: list[int]  # start and end tokens included


@dataclass(frozen=True)
class ImageSource:
    source: str
    param: str  # where it was in the request, for error messages


class _Abandoned(Exception):
    """The caller left (deadline, disconnect): nobody wants the rest of the work."""


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class EmbeddingService:
    def __init__(self, runtime: ModelRuntime, settings: Settings) -> None:
        self.runtime, self.settings = runtime, settings
        model = runtime.loaded.model
        text_tower = getattr(model, "text", None)
        self.text_context: int = getattr(text_tower, "context_length", None) or model.context_length
        self.embed_dim: int = getattr(text_tower, "output_dim", None) or model.text_projection.shape[-1]
        # One forward at a time: torch already spreads one over every core.
        self._forward = threading.Lock()

    # -- validation --------------------------------------------------------------------------------
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.runtime.name:
            raise APIError(404, f"model {name!r} not found; this server serves {self.runtime.name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    def _text(self, text: str, where: str, param: str) -> TextTokens:
        if not text.strip():
            raise _bad(f"{where} is empty", param)
        tok = self.runtime.tokenizer
        ids = [tok.sot_id, *tok.encode(text), tok.eot_id]
        if len(ids) > self.text_context:
            raise _bad(f"{where} is {len(ids)} tokens; this model's text encoder takes at most "
                       f"{self.text_context} tokens", param, "context_length_exceeded")
        return TextTokens(ids)

    def parse_inputs(self, req: EmbeddingRequest) -> list[TextTokens | ImageSource]:
        self._check_model(req.model)
        if req.dimensions is not None and req.dimensions != self.embed_dim:
            raise _bad(f"dimensions {req.dimensions} is not supported: this model's embeddings have "
                       f"{self.embed_dim}", "dimensions", "unsupported_parameter")
        raw = [req.input] if isinstance(req.input, str) else req.input
        if not raw:
            raise _bad("input must not be empty", "input")
        if len(raw) > self.settings.max_embedding_inputs:
            raise _bad(f"input has {len(raw)} items; this server accepts at most "
                       f"{self.settings.max_embedding_inputs} per request", "input")
        items: list[TextTokens | ImageSource] = []
        for i, item in enumerate(raw):
            where = f"input[{i}]" if not isinstance(req.input, str) else "input"
            if isinstance(item, ImagePart):
                items.append(ImageSource(item.image_url.url, where))
            elif isinstance(item, str) and item[:5].lower() == "data:":
                items.append(ImageSource(item, where))
            else:
                items.append(self._text(item.text if isinstance(item, TextPart) else item, where, "input"))
        return items

    # -- the towers (worker thread) ----------------------------------------------------------------
    def _load(self, source: str, where: str, param: str) -> Image.Image:
        try:
            return load_image(source, self.settings.intake_limits)
        except ImageError as e:
            raise APIError(413 if e.code == "image_too_large" else 400, f"{where}: {e}", param=param,
                           code=e.code) from None

    def _image_features(self, image: Image.Image):
        with self._forward:
            return self.runtime.encode_images([image])[0]

    @torch.inference_mode()
    def _text_latent(self, ids: list[int]) -> torch.Tensor:
        with self._forward:
            return self.runtime.loaded.model.encode_text(torch.tensor([ids]), normalize=True)[0].float()

    def _embed_all(self, items: list[TextTokens | ImageSource], cancelled: threading.Event) -> list[torch.Tensor]:
        vectors = []
        for item in items:
            if cancelled.is_set():
                raise _Abandoned
            if isinstance(item, TextTokens):
                vectors.append(self._text_latent(item.ids))
            else:
                features = self._image_features(self._load(item.source, item.param, "input"))
                vectors.append(F.normalize(features.pooled.float(), dim=-1))
        return vectors

    def _classify(self, source: str, labels: list[str], cancelled: threading.Event) -> list[tuple[str, float]]:
        image = self._load(source, "image", "image")
        if cancelled.is_set():
            raise _Abandoned
        features = self._image_features(image)
        # inference_mode here too: classify multiplies by logit_scale, a parameter that requires grad.
        with self._forward, torch.inference_mode():
            return self.runtime.classify(features, labels)

    async def _off_loop(self, work: Callable[[threading.Event], T]) -> T:
        cancelled = threading.Event()
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return await to_thread.run_sync(work, cancelled, abandon_on_cancel=True)
        except TimeoutError:
            raise APIError(504, f"the request took longer than {self.settings.request_timeout_s} s",
                           type="timeout_error", code="timeout") from None
        finally:
            cancelled.set()

    # -- the API -----------------------------------------------------------------------------------
    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        items = self.parse_inputs(req)
        vectors = await self._off_loop(lambda cancelled: self._embed_all(items, cancelled))
        data = [Embedding(i, self._encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
        tokens = sum(len(item.ids) for item in items if isinstance(item, TextTokens))
        return EmbeddingList(data, self.runtime.name, EmbeddingUsage(tokens, tokens))

    @staticmethod
    def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
        if encoding_format == "base64":  # what the openai client asks for by default
            return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        return vector.tolist()

    def labels_for(self, req: ClassifyRequest) -> list[str]:
        labels = list(req.labels) if req.labels is not None else list(self.runtime.loaded.spec.labels)
        if not labels:
            raise _bad("labels must not be empty" if req.labels is not None else
                       "this model has no label set of its own; send labels", "labels")
        if len(labels) > self.settings.max_classify_labels:
            raise _bad(f"labels has {len(labels)} items; this server accepts at most "
                       f"{self.settings.max_classify_labels}", "labels")
        prompt = self.runtime.loaded.spec.extra.get("label_prompt", "{label}")
        for i, label in enumerate(labels):
            self._text(prompt.format(label=label) if label.strip() else "", f"labels[{i}]", "labels")
        return labels

    async def classify(self, req: ClassifyRequest) -> Classification:
        self._check_model(req.model)
        labels = self.labels_for(req)
        ranked = await self._off_loop(lambda cancelled: self._classify(req.image, labels, cancelled))
        return Classification(self.runtime.name, [LabelScore(label, score) for label, score in ranked])

    async def warm_up(self) -> None:
        tok = self.runtime.tokenizer
        await self._off_loop(lambda _: self._text_latent([tok.sot_id, tok.eot_id]))
