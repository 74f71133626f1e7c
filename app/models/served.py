"""A model in service: its loaded family model plus what serving it takes — its own engine (a thread,
its KV and image K/V pools), its own vision stage (feature cache keyed by its encoder, encoder
micro-batching), its share of the memory budgets, its name, version and aliases.

    served = ServedModel(entry, family_model, settings, share)
    served.start(metrics)      # the engine thread and the vision stage (in the app's lifespan)
    ... served.engine.generate(...), served.vision.features(...)
    served.stop()
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from app.metrics import Metrics
from app.models.entry import ModelEntry
from app.models.families.base import FamilyModel
from app.models.schemas import ModelCard, model_card
from app.settings import Settings
from llm.async_engine import AsyncEngine
from llm.engine import Engine
from llm.hardware import resolve_dtype
from vision.stage import VisionStage, parse_visual_tokens

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ServedModel:
    def __init__(self, entry: ModelEntry, model: FamilyModel, settings: Settings, share: float = 1.0) -> None:
        self.entry, self.settings, self.share = entry, settings, share
        self.dtype = resolve_dtype(entry.dtype or settings.dtype)  # auto: what this machine computes fastest in
        self.model = model.with_dtype(self.dtype)  # decoder and vision tower; a copy when loaded in another
        self.name = entry.name or model.name
        self.aliases = entry.aliases
        self.version = entry.version or model.weights_digest[:12]
        self.label = self.name  # metrics and disk cache; the registry makes it NAME@VERSION for two versions
        self.capabilities = model.capabilities
        self.created = int(time.time())
        self.engine: AsyncEngine | None = None
        self.vision: VisionStage | None = None

    @property
    def family(self) -> str:
        return self.model.family

    # -- lifetime ----------------------------------------------------------------------------------
    def start(self, metrics: Metrics | None = None) -> None:
        config = self.settings.engine_config
        config = replace(config, kv_cache_bytes=max(1, int(config.kv_cache_bytes * self.share)),
                         cross_cache_bytes=int(config.cross_cache_bytes * self.share))
        name = self.label

        def on_error(error: Exception) -> None:
            if metrics is not None and isinstance(error, (MemoryError, torch.OutOfMemoryError)):
                metrics.record_oom(name)

        engine = Engine(self.model.decoder, self.model.tokenizer, self.model.stop_ids, config, self.model.vocabulary)
        on_step = (lambda _, outputs: metrics.observe_engine_step(name, outputs)) if metrics is not None else None
        self.engine = AsyncEngine(engine, on_step=on_step, on_error=on_error)
        if metrics is not None:
            metrics.bind_engine(name, engine.stats)
        self.engine.start()
        if self.model.encoder is not None:
            self.vision = VisionStage(self.model.encoder, self._vision_config())

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.vision is not None:
            self.vision.close()

    def _vision_config(self):
        base = self.settings.vision_stage_config
        visual_tokens = (parse_visual_tokens(self.entry.visual_tokens) if self.entry.visual_tokens is not None
                         else base.default_visual_tokens)
        disk = str(Path(base.disk_dir) / _UNSAFE.sub("_", self.label)) if base.disk_dir else None
        return replace(base, hot_bytes=int(base.hot_bytes * self.share), disk_dir=disk,
                       disk_bytes=max(1, int(base.disk_bytes * self.share)), default_visual_tokens=visual_tokens)

    # -- what /v1/models says ----------------------------------------------------------------------
    def card(self) -> ModelCard:
        return model_card(self.name, self.created, family=self.family, version=self.version,
                         aliases=list(self.aliases), capabilities=self.capabilities.summary(),
                         context_length=self.model.context_length)
