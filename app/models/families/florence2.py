"""The Florence-2 family: a Hugging Face `Florence2ForConditionalGeneration` directory (transformers 5.x's
layout, as `florence-community/Florence-2-base` has it).

    config.json, model.safetensors, tokenizer.json + tokenizer_config.json (BART's BPE with <image>),
    preprocessor_config.json (CLIPImageProcessor), generation_config.json
      -> Florence2VisionEncoder (vision/encoders/florence2.py: DaViT + projector, behind the vision stage
         and its feature cache), BartDecoder with the BART encoder attached (llm/models/bart.py),
         HFTextTokenizer, the task prompts (florence2_prompts.py), BART's start and end rules

What the decoder cross-attends to is the BART encoder's output over the image tokens followed by the
prompt's embeddings: `memory()` hands the engine exactly that input, named by the image's feature
digest and the prompt's, so the encoder and the cross-attention K/V run once per (image, prompt) and
are pooled like any image K/V.

The decoder's prompt is fixed: decoder_start_token_id, then forced_bos_token_id (generate forces it as
the first new token; here it is part of the prompt). One image per conversation, one user message
(a task token such as <CAPTION>, <DETAILED_CAPTION>, <OCR>, or free text as the processor passes it on;
none: <CAPTION>). Sampling as requested (greedy by default); generate's beam search and
no_repeat_ngram_size, when a generation config asks for them, are not reproduced.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from app.chat.conversation import Conversation
from app.models.families.base import PromptError
from app.models.families.captioner import CAPTIONER, caption_prompt_text, with_dtype
from app.models.families.florence2_prompts import DEFAULT_TASK, TaskPromptError, encoder_text
from llm.engine import ImageInput
from llm.loading.bart_weights import BartLayout, bart_decoder
from llm.loading.errors import ModelDirError
from llm.loading.hf import file_digest, load_tensors, read_config, read_json, safetensors_files
from llm.loading.hf_text_tokenizer import HFTextTokenizer
from llm.models.bart import BartConfig, BartDecoder
from vision.encoders.florence2 import VISION_PREFIXES, Florence2VisionEncoder

FAMILY = "florence2"
ARCHITECTURE = "Florence2ForConditionalGeneration"
LM = "model.language_model."
LAYOUT = BartLayout(decoder=f"{LM}decoder.", encoder=f"{LM}encoder.",
                    embeddings=(f"{LM}shared.weight", f"{LM}decoder.embed_tokens.weight", f"{LM}encoder.embed_tokens.weight"),
                    lm_head=("lm_head.weight",))


def _generation_ids(path: Path, text: dict) -> dict:
    """BART's start and end ids: generation_config.json's, else the text config's."""
    gen_file = path / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else {}
    ids = {k: gen.get(k, text.get(k)) for k in ("decoder_start_token_id", "forced_bos_token_id", "eos_token_id",
                                                 "bos_token_id")}
    if ids["decoder_start_token_id"] is None or ids["eos_token_id"] is None:
        raise ModelDirError(f"{path}: no decoder_start_token_id / eos_token_id in generation_config.json or config.json")
    return ids


class Florence2Model:
    family = FAMILY
    labels: tuple[str, ...] = ()
    contrastive = None
    vocabulary = None  # no structured output: its answers are task formats (locations, OCR) of their own
    tool_format = None
    capabilities = CAPTIONER  # one image and an optional task prompt: a caption model (app/models/families/captioner.py)

    def __init__(self, path: str | Path, max_context: int | None = None) -> None:
        path = Path(path)
        config = read_config(path)
        if not self.detect(path):
            raise ModelDirError(f"{path / 'config.json'} is not a {ARCHITECTURE} checkpoint")
        text = config["text_config"]
        self.name = path.name
        self.dtype = torch.float32  # as loaded; with_dtype converts
        self.weights_digest = file_digest(safetensors_files(path))
        self.tokenizer = HFTextTokenizer(path)
        tensors = load_tensors(path, (LM, "lm_head.") + VISION_PREFIXES)
        decoder_cfg = BartConfig.from_hf(text, "decoder")
        if max_context is not None and max_context < decoder_cfg.max_positions:
            # the decoder's positions only: the encoder keeps its own (image tokens + prompt)
            decoder_cfg = replace(decoder_cfg, max_positions=max_context)
            tensors[f"{LM}decoder.embed_positions.weight"] = tensors[f"{LM}decoder.embed_positions.weight"][: max_context + 2]
        self.decoder: BartDecoder = bart_decoder(tensors, LAYOUT, decoder_cfg, BartConfig.from_hf(text, "encoder"))
        self.encoder = Florence2VisionEncoder.from_state(config, tensors, read_json(path / "preprocessor_config.json"),
                                                         self.name)
        ids = _generation_ids(path, text)
        self.bos_id = ids["bos_token_id"] if ids["bos_token_id"] is not None else 0
        self.eos_id = ids["eos_token_id"]
        self.decoder_prompt = [ids["decoder_start_token_id"]] + (
            [ids["forced_bos_token_id"]] if ids["forced_bos_token_id"] is not None else [])
        self.stop_ids = (self.eos_id,)

    @classmethod
    def load(cls, path: Path, max_context: int | None = None, dtype: torch.dtype = torch.float32) -> "Florence2Model":
        return cls(path, max_context).with_dtype(dtype)

    def with_dtype(self, dtype: torch.dtype) -> "Florence2Model":
        return with_dtype(self, dtype)

    @staticmethod
    def detect(path: Path) -> bool:
        try:
            config = read_config(path)
        except ModelDirError:
            return False
        return ARCHITECTURE in config.get("architectures", []) or config.get("model_type") == FAMILY

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    # -- prompts -----------------------------------------------------------------------------------
    def task(self, conversation: Conversation) -> str:
        """The client's prompt for the processor: the one user message's text, <CAPTION> when it has
        none (or asks the generic caption question). Raises PromptError for what Florence-2 cannot take."""
        return caption_prompt_text(conversation) or DEFAULT_TASK

    def encoder_ids(self, conversation: Conversation) -> list[int]:
        """<s> {the task's text} </s>: the prompt part of the encoder's input (the image tokens go first)."""
        try:
            text = encoder_text(self.task(conversation))
        except TaskPromptError as e:
            raise PromptError(str(e)) from None
        ids = [self.bos_id, *self.tokenizer.encode(text), self.eos_id]
        room = self.decoder.encoder.cfg.max_positions - self.encoder.tokens_per_image
        if len(ids) > room:
            raise PromptError(f"the task prompt takes {len(ids)} tokens; Florence-2's encoder has room for {room} "
                              f"after the image's {self.encoder.tokens_per_image}")
        return ids

    def chat_prompt(self, conversation: Conversation) -> list[int]:
        """The decoder's prompt (fixed); the conversation is checked here so that a bad one is a 400 early."""
        self.encoder_ids(conversation)
        return list(self.decoder_prompt)

    @torch.inference_mode()
    def memory(self, images: tuple[ImageInput, ...], conversation: Conversation) -> tuple[ImageInput, ...]:
        """The BART encoder's input for the engine: the image's tokens, then the prompt's embeddings,
        named by both digests (PromptedMemory)."""
        (image,) = images
        ids = self.encoder_ids(conversation)
        prompt = self.decoder.embed(torch.tensor(ids, device=self.decoder.embed_tokens.weight.device))
        digest = hashlib.sha256(f"{image.digest}|florence2-prompt|{ids}".encode()).hexdigest()
        return (ImageInput(digest, torch.cat([image.tokens.to(prompt.dtype), prompt])),)
