"""One loaded model, ready to answer: the vision encoder, the decoder, the tokenizer and prompt format.

The CLI and the HTTP app both drive this object; it holds no request state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from llm.chat_format import CAPTION_QUESTION, CaptionOnlyFormat, ChatFormat, Turn
from llm.checkpoint import LoadedModel, load_model_dir
from llm.coca import CoCaDecoder, decoder_from_open_clip
from llm.engine import Engine, EngineConfig
from llm.generate import GenerationParams, generate_greedy
from llm.packed_linear import dense_copy, pack_linears
from vision.encoder import ImageFeatures, VisionEncoder
from vision.preprocess import PreprocessCfg


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class ModelRuntime:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.name = loaded.spec.name
        self.tokenizer = loaded.tokenizer
        self.encoder = VisionEncoder(loaded.model.visual, PreprocessCfg.from_dict(loaded.spec.preprocess),
                                     loaded.spec.name, loaded.weights_digest)
        self.decoder: CoCaDecoder = decoder_from_open_clip(loaded.spec.coca, loaded.model.state_dict())
        # From here on the tower only infers (for the encoder and zero-shot alike): oneDNN-packed linears
        # and attention projections, after the decoder took its weights from the state dict.
        pack_linears(loaded.model.visual)
        self.format = (ChatFormat(self.tokenizer) if loaded.spec.prompt_format == "qa-chat"
                       else CaptionOnlyFormat(self.tokenizer))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelRuntime":
        return cls(load_model_dir(path))

    @property
    def context_length(self) -> int:
        return self.decoder.cfg.context_length

    def new_engine(self, config: EngineConfig, dtype: str = "float32") -> Engine:
        """A long-lived engine over this model (the server's); `complete` below runs its own per call.
        dtype "bfloat16" runs the decoder on a bf16 copy of its weights (half the bytes per token)."""
        decoder = self.decoder if dtype == "float32" else dense_copy(self.decoder).to(getattr(torch, dtype))
        return Engine(decoder, self.tokenizer, self.format.stop_ids, config)

    def encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        return self.encoder.encode(images)

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        return self.format.prompt(turns)

    def complete(self, features: list[ImageFeatures], prompts: list[list[int]],
                 max_new_tokens: int = 32) -> list[Completion]:
        image_embs = torch.stack([f.tokens for f in features])
        params = GenerationParams(max_new_tokens=max_new_tokens, stop_ids=self.format.stop_ids)
        outputs = generate_greedy(self.decoder, image_embs, prompts, params)
        results = []
        for prompt, new in zip(prompts, outputs):
            hit_limit = len(new) >= max_new_tokens or len(prompt) + len(new) >= self.context_length
            results.append(Completion(self.tokenizer.decode(new), len(prompt), len(new) + (not hit_limit),
                                      "length" if hit_limit else "stop"))
        return results

    def answer(self, image: Image.Image, turns: list[Turn], max_new_tokens: int = 32) -> Completion:
        return self.complete(self.encode_images([image]), [self.prompt_ids(turns)], max_new_tokens)[0]

    def caption(self, images: list[Image.Image], max_new_tokens: int = 32) -> list[str]:
        prompt = self.prompt_ids([Turn(CAPTION_QUESTION)])
        completions = self.complete(self.encode_images(images), [prompt] * len(images), max_new_tokens)
        return [c.text for c in completions]

    @torch.inference_mode()
    def label_latents(self, labels: list[str]) -> torch.Tensor:
        """Normalized text latents of zero-shot label prompts, each encoded unpadded (open_clip's
        CLS mask is off by one under padding)."""
        prompt = self.loaded.spec.extra.get("label_prompt", "{label}")
        tok = self.tokenizer
        latents = [self.loaded.model.encode_text(
            torch.tensor([[tok.sot_id, *tok.encode(prompt.format(label=l)), tok.eot_id]]), normalize=True)[0]
            for l in labels]
        return torch.stack(latents)

    @torch.inference_mode()
    def classify(self, features: ImageFeatures, labels: list[str]) -> list[tuple[str, float]]:
        """Zero-shot: softmax over the labels of the scaled cosine similarity, best first."""
        image = F.normalize(features.pooled.float(), dim=-1)
        scores = (self.loaded.model.logit_scale.exp() * self.label_latents(labels) @ image).softmax(-1)
        return sorted(zip(labels, scores.tolist()), key=lambda x: -x[1])
