"""Contrastive embeddings and zero-shot classification, from a served model's two towers (a model whose
family declares `embeddings` / `zero_shot`; any other is a 400 naming it).

Images: the vision tower's pooled output through the model's vision stage (intake limits, remote-URL
policy, feature cache and encoder batching as for chat), L2-normalised. Text: the text tower on
`[sot, *tokens, eot]`, one input at a time and unpadded (app/models/contrastive.py). Both land in one
space: the dot product of an image and a text embedding is their cosine similarity.

Inputs go one at a time, so a request with many images holds at most one decoded image (a PNG of a
few KB can decode to the full pixel cap). The work runs in a worker thread; past the deadline the
request gets 504 and the worker stops before its next input.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from anyio import to_thread

from app.chat.schemas import ImagePart, TextPart
from app.embeddings.schemas import (Classification, ClassifyRequest, Embedding, EmbeddingList, EmbeddingRequest,
                                    EmbeddingUsage, LabelScore)
from app.errors import APIError, bad_request
from app.models.contrastive import ZeroShot, image_latent
from app.models.registry import ROUTED, ModelRegistry
from app.models.served import ServedModel
from app.settings import Settings
from app.tenancy.record import UsageObserver
from vision.intake import ImageError

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


class EmbeddingService:
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry, self.settings = registry, settings
        # One forward at a time: torch already spreads one over every core.
        self._forward = threading.Lock()
        self._zero_shot: dict[str, ZeroShot] = {}

    # -- which model -------------------------------------------------------------------------------
    def model_for(self, name: str | None, capability: str) -> ServedModel:
        """The model a request names, which must have `capability` ("embeddings" or "zero_shot"). No
        name, or the routed alias: the default model if it has it, else the first served one that does."""
        able = [m for m in self.registry if getattr(m.capabilities, capability)]
        target = self.registry.resolve(name)
        if target is ROUTED or name is None:
            default = self.registry.get(self.registry.default)
            target = default if default in able else (able[0] if able else default)
        if target not in able:
            offered = ", ".join(m.name for m in able) or "none"
            raise bad_request(f"model {target.name!r} has no contrastive towers, so it offers no "
                       f"{capability.replace('_', '-')} ({target.family} family); models that do: {offered}",
                       "model", "unsupported_model")
        return target

    # -- validation --------------------------------------------------------------------------------
    def _text(self, model: ServedModel, text: str, where: str, param: str) -> TextTokens:
        if not text.strip():
            raise bad_request(f"{where} is empty", param)
        towers = model.model.contrastive
        ids = towers.text_ids(text)
        if len(ids) > towers.text_context:
            raise bad_request(f"{where} is {len(ids)} tokens; this model's text encoder takes at most "
                       f"{towers.text_context} tokens", param, "context_length_exceeded")
        return TextTokens(ids)

    def parse_inputs(self, model: ServedModel, req: EmbeddingRequest) -> list[TextTokens | ImageSource]:
        embed_dim = model.model.contrastive.embed_dim
        if req.dimensions is not None and req.dimensions != embed_dim:
            raise bad_request(f"dimensions {req.dimensions} is not supported: this model's embeddings have "
                       f"{embed_dim}", "dimensions", "unsupported_parameter")
        raw = [req.input] if isinstance(req.input, str) else req.input
        if not raw:
            raise bad_request("input must not be empty", "input")
        if len(raw) > self.settings.max_embedding_inputs:
            raise bad_request(f"input has {len(raw)} items; this server accepts at most "
                       f"{self.settings.max_embedding_inputs} per request", "input")
        items: list[TextTokens | ImageSource] = []
        for i, item in enumerate(raw):
            where = f"input[{i}]" if not isinstance(req.input, str) else "input"
            if isinstance(item, (int, list)):
                raise bad_request(f"{where} is token ids: this server embeds text and images, each model with its "
                                  f"own tokenizer; send the text", where, "unsupported_parameter")
            if isinstance(item, ImagePart):
                if item.image_url.detail == "low":  # "high": what every image gets, embedded whole
                    raise bad_request(f"{where}.image_url.detail 'low' is not supported: an image is embedded whole",
                                      f"{where}.image_url.detail", "unsupported_parameter")
                items.append(ImageSource(item.image_url.url, where))
            elif isinstance(item, str) and item[:5].lower() == "data:":
                items.append(ImageSource(item, where))
            else:
                items.append(self._text(model, item.text if isinstance(item, TextPart) else item, where, "input"))
        return items

    # -- the towers (worker thread) ----------------------------------------------------------------
    def _image_features(self, model: ServedModel, source: str, where: str, param: str, tenant: str | None,
                        observer: UsageObserver | None = None):
        try:
            result = model.vision.features(source, None, tenant)
            if observer is not None:
                observer.image(result.image_digest, result.pixels)
            return result.features
        except ImageError as e:
            raise APIError(413 if e.code == "image_too_large" else 400, f"{where}: {e}", param=param,
                           code=e.code) from None

    def _text_latent(self, model: ServedModel, ids: list[int]) -> torch.Tensor:
        with self._forward:
            return model.model.contrastive.text_latent(ids)

    def _embed_all(self, model: ServedModel, items: list[TextTokens | ImageSource], tenant: str | None,
                   cancelled: threading.Event, observer: UsageObserver | None = None) -> list[torch.Tensor]:
        vectors = []
        for item in items:
            if cancelled.is_set():
                raise _Abandoned
            if isinstance(item, TextTokens):
                vectors.append(self._text_latent(model, item.ids))
            else:
                vectors.append(image_latent(self._image_features(model, item.source, item.param, "input", tenant,
                                                                 observer)))
        return vectors

    def _classify(self, model: ServedModel, source: str, labels: list[str] | None, tenant: str | None,
                  cancelled: threading.Event, observer: UsageObserver | None = None) -> list[tuple[str, float]]:
        features = self._image_features(model, source, "image", "image", tenant, observer)
        if cancelled.is_set():
            raise _Abandoned
        with self._forward:
            return self.zero_shot(model).classify(features, labels)

    def zero_shot(self, model: ServedModel) -> ZeroShot:
        """The model's own label set, its latents computed once per model."""
        if model.name not in self._zero_shot:
            self._zero_shot[model.name] = ZeroShot(model.model.contrastive, list(model.model.labels))
        return self._zero_shot[model.name]

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
    async def embed(self, req: EmbeddingRequest, model: ServedModel, tenant: str | None = None,
                    observer: UsageObserver | None = None) -> EmbeddingList:
        """`model`: `model_for(req.model, "embeddings")`; `observer` hears the images and tokens."""
        items = self.parse_inputs(model, req)
        if observer is not None:
            observer.routed(model.name, model.version)
        vectors = await self._off_loop(lambda cancelled: self._embed_all(model, items, tenant, cancelled, observer))
        data = [Embedding(i, self._encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
        tokens = sum(len(item.ids) for item in items if isinstance(item, TextTokens))
        if observer is not None:
            observer.finished(tokens, 0, None)
        return EmbeddingList(data, model.name, EmbeddingUsage(tokens, tokens))

    @staticmethod
    def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
        if encoding_format == "base64":  # what the openai client asks for by default
            return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        return vector.tolist()

    def labels_for(self, model: ServedModel, req: ClassifyRequest) -> list[str] | None:
        """The request's labels, checked; None: the model's own set."""
        if req.labels is None:
            if not model.model.labels:
                raise bad_request("this model has no label set of its own; send labels", "labels")
            return None
        labels = list(req.labels)
        if not labels:
            raise bad_request("labels must not be empty", "labels")
        if len(labels) > self.settings.max_classify_labels:
            raise bad_request(f"labels has {len(labels)} items; this server accepts at most "
                       f"{self.settings.max_classify_labels}", "labels")
        prompt = model.model.contrastive.label_prompt
        for i, label in enumerate(labels):
            self._text(model, prompt.format(label=label) if label.strip() else "", f"labels[{i}]", "labels")
        return labels

    async def classify(self, req: ClassifyRequest, model: ServedModel, tenant: str | None = None,
                       observer: UsageObserver | None = None) -> Classification:
        """`model`: `model_for(req.model, "zero_shot")`; `observer` hears the image (no tokens are counted:
        the labels' latents are the model's, or computed per request without a prompt)."""
        labels = self.labels_for(model, req)
        if observer is not None:
            observer.routed(model.name, model.version)
        ranked = await self._off_loop(lambda cancelled: self._classify(model, req.image, labels, tenant, cancelled,
                                                                       observer))
        return Classification(model.name, [LabelScore(label, score) for label, score in ranked])

    async def warm_up(self) -> None:
        for model in self.registry:
            if model.capabilities.embeddings:
                towers = model.model.contrastive
                await self._off_loop(lambda _: self._text_latent(model, towers.text_ids("")))
