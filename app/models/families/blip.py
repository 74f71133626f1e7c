"""The BLIP captioning family: a Hugging Face directory whose config.json names
BlipForConditionalGeneration.

    config.json (text_config, vision_config), *.safetensors, tokenizer files (BERT's), preprocessor_config.json
      -> HFVisionEncoder over BlipVisionModel (vision/encoders/hf_vision.py), BlipTextDecoder
         (llm/models/blip_text.py), HFTextTokenizer

As transformers' `BlipForConditionalGeneration.generate`: the prompt is text_config.bos_token_id
([DEC]) followed by the text prefix's tokens (the processor's [CLS] replaced by [DEC], its [SEP]
dropped), and generation ends at text_config.sep_token_id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.chat.conversation import Conversation
from app.models.families.captioner import CAPTIONER, caption_prompt_text, with_dtype
from llm.loading.errors import ModelDirError
from llm.loading.hf import file_digest, load_tensors, read_config, read_json, safetensors_files
from llm.loading.hf_text_tokenizer import HFTextTokenizer
from llm.models.blip_text import blip_text_decoder
from vision.encoders.hf_vision import blip_encoder

FAMILY = "blip"
ARCHITECTURE = "BlipForConditionalGeneration"


class BlipModel:
    family = FAMILY
    labels: tuple[str, ...] = ()
    contrastive = None
    vocabulary = None
    tool_format = None
    capabilities = CAPTIONER

    def __init__(self, path: str | Path, max_context: int | None = None) -> None:
        path = Path(path)
        raw = read_config(path)
        from transformers import BlipConfig  # noqa: PLC0415

        config = BlipConfig.from_dict(raw)
        tensors = load_tensors(path, ("text_decoder.",))
        self.name = path.name
        self.dtype = torch.float32  # as loaded; with_dtype converts
        self.weights_digest = file_digest(safetensors_files(path))
        self.tokenizer = HFTextTokenizer(path)
        self.encoder = blip_encoder(path, read_json(path / "preprocessor_config.json"), self.name,
                                    self.weights_digest)
        text = config.text_config
        try:
            self.decoder = blip_text_decoder(text.to_dict(), {k.removeprefix("text_decoder."): v for k, v in
                                                              tensors.items() if k.startswith("text_decoder.")},
                                             max_context)
        except (KeyError, ValueError) as e:
            raise ModelDirError(f"{path}: the BLIP text decoder cannot be built: {e}") from None
        self.start_id = int(text.bos_token_id)
        self.stop_ids = (int(text.sep_token_id),)

    @classmethod
    def load(cls, path: Path, max_context: int | None = None, dtype: torch.dtype = torch.float32) -> "BlipModel":
        return cls(path, max_context).with_dtype(dtype)

    def with_dtype(self, dtype: torch.dtype) -> "BlipModel":
        return with_dtype(self, dtype)

    @staticmethod
    def detect(path: Path) -> bool:
        try:
            config = read_config(path)
        except ModelDirError:
            return False
        return ARCHITECTURE in config.get("architectures", [])

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    def prompt_ids(self, text: str = "") -> list[int]:
        return [self.start_id, *(self.tokenizer.encode(text) if text else [])]

    def chat_prompt(self, conversation: Conversation) -> list[int]:
        return self.prompt_ids(caption_prompt_text(conversation))
