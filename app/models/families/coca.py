"""The CoCa family: the bundled demo model (mmserve format) and open_clip CoCa checkpoints.

    checkpoint (llm/loading/coca_checkpoint.py) -> open_clip.CoCa with its vision tower (vision/towers.py)
      -> VisionEncoder (the visual tower), CoCaDecoder (llm/models/coca.py), the text tower (embeddings,
         zero-shot), the tokenizer and the prompt format (llm/loading/chat_format.py)

A CoCa decoder cross-attends to exactly one image. The demo model's `qa-chat` format answers
questions over several turns; open_clip checkpoints caption only (their prompt is the start token).
Both have contrastive towers: embeddings and zero-shot labels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import open_clip
import torch
from PIL import Image

from app.chat.conversation import Conversation
from app.models.capabilities import Capabilities
from app.models.contrastive import ZeroShot
from app.models.families.base import PromptError
from llm.generate import generate_greedy
from llm.params import SamplingParams
from llm.loading.chat_format import CAPTION_QUESTION, CaptionOnlyFormat, ChatFormat, Turn
from llm.loading.coca_checkpoint import CoCaCheckpoint, ModelDirError, ModelSpec, is_coca_dir, read_coca_dir
from llm.loading.decoder_checkpoint import DecoderRecord, configured, load_decoder, read_record
from llm.loading.tokenizers import CoCaTokenizer
from llm.models.coca import CoCaDecoder, CoCaDecoderConfig, decoder_from_open_clip
from llm.packed_linear import dense_copy, pack_linears
from vision.encoders.base import ImageFeatures
from vision.encoders.open_clip import VisionEncoder
from vision.preprocess import PreprocessCfg
from vision.towers import ConvTower, ConvTowerCfg

FAMILY = "coca"


def build_coca(spec: ModelSpec) -> open_clip.CoCa:
    """open_clip's CoCa from a spec, its visual tower swapped for the demo's CNN tower when it names one."""
    model = open_clip.CoCa(**spec.coca)
    if spec.vision_tower is not None:
        if spec.vision_tower.get("type") != "conv":
            raise ModelDirError(f"unknown vision tower type {spec.vision_tower.get('type')!r}")
        model.visual = ConvTower(ConvTowerCfg.from_dict({k: v for k, v in spec.vision_tower.items() if k != "type"}))
    return model


@dataclass
class LoadedCoCa:
    spec: ModelSpec
    model: open_clip.CoCa  # eval mode, fp32
    tokenizer: CoCaTokenizer
    weights_digest: str
    path: Path | None = None
    # A compressed decoder (llm/loading/decoder_checkpoint.py): the directory holds it apart, and
    # open_clip's own multimodal decoder (`text_decoder.*`) is left out of model.safetensors.
    record: DecoderRecord | None = None

    def decoder(self) -> CoCaDecoder:
        """Our decoder: the compressed one the record names, else built from open_clip's weights."""
        if self.record is None:
            return decoder_from_open_clip(self.spec.coca, self.model.state_dict())
        cfg = configured(CoCaDecoderConfig.from_coca_kwargs(self.spec.coca), self.record)
        with torch.device("meta"):
            empty = CoCaDecoder(cfg)
        return load_decoder(empty, self.path, self.record)


def load_coca(path: str | Path) -> LoadedCoCa:
    """The whole open_clip model of a CoCa checkpoint directory (training, evaluation, serving)."""
    ckpt: CoCaCheckpoint = read_coca_dir(path)
    model = build_coca(ckpt.spec)
    record = read_record(ckpt.spec.extra, f"{path}/config.json")
    missing, unexpected = model.load_state_dict(ckpt.state, strict=record is None)
    if record is not None and (unexpected or any(not k.startswith("text_decoder.") for k in missing)):
        raise ModelDirError(f"{path}/model.safetensors does not fit its config: missing "
                            f"{[k for k in missing if not k.startswith('text_decoder.')][:3]}, unexpected {unexpected[:3]}")
    return LoadedCoCa(ckpt.spec, model.eval(), ckpt.tokenizer, ckpt.weights_digest, Path(path), record)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class CoCaTextTower:
    """open_clip's text tower as `ContrastiveTowers`: `[sot, *tokens, eot]`, one input at a time and
    unpadded (open_clip's CLS mask is off by one under padding)."""

    def __init__(self, model: open_clip.CoCa, tokenizer: CoCaTokenizer, label_prompt: str) -> None:
        self._model, self._tok = model, tokenizer
        self.embed_dim = int(model.text.output_dim)
        self.text_context = int(model.text.context_length)
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.label_prompt = label_prompt

    def text_ids(self, text: str) -> list[int]:
        return [self._tok.sot_id, *self._tok.encode(text), self._tok.eot_id]

    @torch.inference_mode()
    def text_latent(self, ids: list[int]) -> torch.Tensor:
        return self._model.encode_text(torch.tensor([ids]), normalize=True)[0].float()


class CoCaModel:
    family = FAMILY

    def __init__(self, loaded: LoadedCoCa, dtype: torch.dtype = torch.float32) -> None:
        """`dtype`: the decoder's and the vision tower's; the text tower (label and prompt latents, a
        few calls per label set) stays fp32."""
        self.loaded, self.dtype = loaded, dtype
        spec = loaded.spec
        loaded.model.visual.to(dtype)
        self.name = spec.name
        self.weights_digest = loaded.weights_digest
        self.tokenizer = loaded.tokenizer
        self.labels = tuple(spec.labels)
        self.encoder = VisionEncoder(loaded.model.visual, PreprocessCfg.from_dict(spec.preprocess), spec.name,
                                     loaded.weights_digest)
        self.decoder: CoCaDecoder = loaded.decoder().to(dtype)
        # From here on the tower only infers (for the encoder and zero-shot alike): oneDNN-packed linears
        # and attention projections, after the decoder took its weights from the state dict.
        pack_linears(loaded.model.visual)
        chat = spec.prompt_format == "qa-chat"
        self.format = ChatFormat(self.tokenizer) if chat else CaptionOnlyFormat(self.tokenizer)
        self.stop_ids = self.format.stop_ids
        self.vocabulary = self.tokenizer.vocabulary()
        self.tool_format = None  # the demo's prompt format has no place for tools
        self.contrastive = CoCaTextTower(loaded.model, self.tokenizer, spec.extra.get("label_prompt", "{label}"))
        self.capabilities = Capabilities(questions=chat, captions=True, max_images=1, text_only=False,
                                         embeddings=True, zero_shot=True,
                                         structured_output=self.vocabulary is not None, tools=False)
        self._zero_shot: ZeroShot | None = None

    @classmethod
    def from_dir(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "CoCaModel":
        return cls(load_coca(path), dtype)

    @classmethod
    def load(cls, path: Path, max_context: int | None = None, dtype: torch.dtype = torch.float32) -> "CoCaModel":
        """(A CoCa context is the learned positional table's length: `max_context` does not apply.)"""
        return cls.from_dir(path, dtype)

    def with_dtype(self, dtype: torch.dtype) -> "CoCaModel":
        if dtype == self.dtype:
            return self
        # the decoder's weights come from the open_clip model's state dict, which the packed linears of
        # this one's tower no longer hold: from a dense copy, in fp32 for the text tower
        model = dense_copy(self.loaded.model).float()
        return CoCaModel(replace(self.loaded, model=model), dtype)

    @staticmethod
    def detect(path: Path) -> bool:
        return is_coca_dir(path)

    @property
    def context_length(self) -> int:
        return self.decoder.cfg.context_length

    # -- prompts -----------------------------------------------------------------------------------
    def chat_prompt(self, conversation: Conversation) -> list[int]:
        """System messages carry no meaning for these models and are skipped; user and assistant
        messages alternate; an image with no text asks for a caption."""
        turns: list[Turn] = []
        pending: str | None = None
        for i, message in enumerate(conversation.messages):
            if message.role == "user":
                if pending is not None:
                    raise PromptError(f"messages[{i}]: two user messages in a row; put an assistant reply "
                                      f"between them")
                pending = message.text or CAPTION_QUESTION
            elif message.role == "assistant":
                if pending is None:
                    raise PromptError(f"messages[{i}]: an assistant message must follow a user message")
                turns.append(Turn(pending, message.text))
                pending = None
        turns.append(Turn(pending))
        try:
            return self.format.prompt(turns)
        except ValueError as e:
            raise PromptError(str(e)) from None

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        return self.format.prompt(turns)

    # -- one-shot use (CLI, evaluation): a throwaway engine per call ---------------------------------
    def encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        return self.encoder.encode(images)

    def complete(self, features: list[ImageFeatures], prompts: list[list[int]],
                 max_new_tokens: int = 32) -> list[Completion]:
        image_embs = torch.stack([f.tokens for f in features])
        params = SamplingParams(max_tokens=max_new_tokens, stop_token_ids=self.stop_ids)
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

    @property
    def zero_shot(self) -> ZeroShot:
        """Its own label set, latents computed once."""
        if self._zero_shot is None:
            self._zero_shot = ZeroShot(self.contrastive, list(self.labels))
        return self._zero_shot

    def label_latents(self, labels: list[str]) -> torch.Tensor:
        return self.zero_shot.latents(labels)

    def classify(self, features: ImageFeatures, labels: list[str]) -> list[tuple[str, float]]:
        return self.zero_shot.classify(features, labels)
