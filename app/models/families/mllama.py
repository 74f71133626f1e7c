"""The Llama-3.2-Vision family: a Hugging Face `MllamaForConditionalGeneration` directory as the hub
lays it out.

    config.json, *.safetensors (+ model.safetensors.index.json), tokenizer.json + tokenizer_config.json,
    the chat template (tokenizer_config.json, chat_template.json or chat_template.jinja),
    preprocessor_config.json, generation_config.json
      -> MllamaDecoder (llm/models/mllama.py), MllamaVisionEncoder (vision/encoders/mllama.py),
         HFChatTokenizer (llm/loading/chat_template.py), stop ids from the generation config

Several images per conversation, in any user turn, and text-only conversations; no contrastive towers
(no embeddings, no zero-shot labels). Tool calling in Llama 3.1/3.2's JSON format (app/chat/tools.py),
tools and tool results through the checkpoint's own template; structured outputs over its byte-level
BPE vocabulary.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from app.chat.conversation import Conversation, ImageRef, Message
from app.chat.tools import JsonToolCalls
from app.models.capabilities import Capabilities
from app.models.families.base import PromptError
from llm.loading.chat_template import HFChatTokenizer
from llm.loading.errors import ModelDirError
from llm.loading.decoder_checkpoint import configured, load_decoder, read_record
from llm.loading.hf import file_digest, generation_stop_ids, load_tensors, read_config, read_json, safetensors_files
from llm.models.mllama import MllamaDecoder, MllamaDecoderConfig, mllama_from_hf_dir
from llm.packed_linear import dense_copy
from vision.encoders.mllama import VISION_PREFIXES, MllamaVisionEncoder

FAMILY = "mllama"
ARCHITECTURE = "MllamaForConditionalGeneration"
MAX_IMAGES = 1 << 16  # no limit of the family's own: the server's max_images_per_request applies


class MllamaModel:
    family = FAMILY
    labels: tuple[str, ...] = ()
    contrastive = None

    def __init__(self, path: str | Path, max_context: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        path = Path(path)
        self.dtype = dtype
        config = read_config(path)
        if ARCHITECTURE not in config.get("architectures", []) and config.get("model_type") != "mllama":
            raise ModelDirError(f"{path / 'config.json'} is not a {ARCHITECTURE} checkpoint")
        preprocess = read_json(path / "preprocessor_config.json")
        self.name = path.name
        self.tokenizer = HFChatTokenizer(path)
        self.weights_digest = file_digest(safetensors_files(path))
        self.decoder: MllamaDecoder = self._load_decoder(path, config, max_context, dtype)
        self.encoder = MllamaVisionEncoder.from_state(config["vision_config"], load_tensors(path, VISION_PREFIXES),
                                                      preprocess, self.name).to(dtype)
        self.stop_ids = generation_stop_ids(path, config)
        image_token = self.decoder.cfg.image_token_id
        if self.tokenizer.token_id("<|image|>") not in (None, image_token):
            raise ModelDirError(f"{path}: the tokenizer's <|image|> is not config.json's image_token_index "
                                f"{image_token}")
        self.vocabulary = self.tokenizer.vocabulary()
        self.tool_format = JsonToolCalls()
        self.capabilities = Capabilities(questions=True, captions=True, max_images=MAX_IMAGES, text_only=True,
                                         embeddings=False, zero_shot=False,
                                         structured_output=self.vocabulary is not None, tools=True)

    @staticmethod
    def _load_decoder(path: Path, config: dict, max_context: int | None,
                      dtype: torch.dtype) -> MllamaDecoder:
        """transformers' language-model weights, or the compressed decoder config.json's record names
        (`mmserve quantize`: llm/loading/decoder_checkpoint.py)."""
        record = read_record(config, str(path / "config.json"))
        if record is None:
            return mllama_from_hf_dir(path, max_context, dtype)
        with torch.device("meta"):
            empty = MllamaDecoder(configured(MllamaDecoderConfig.from_hf(config, max_context), record))
        return load_decoder(empty, path, record).to(dtype)

    @classmethod
    def load(cls, path: Path, max_context: int | None = None, dtype: torch.dtype = torch.float32) -> "MllamaModel":
        return cls(path, max_context, dtype)

    def with_dtype(self, dtype: torch.dtype) -> "MllamaModel":
        if dtype == self.dtype:
            return self
        other = copy.copy(self)
        other.dtype, other.decoder, other.encoder = dtype, dense_copy(self.decoder).to(dtype), self.encoder.to(dtype)
        return other

    @staticmethod
    def detect(path: Path) -> bool:
        try:
            config = read_config(path)
        except ModelDirError:
            return False
        return ARCHITECTURE in config.get("architectures", []) or config.get("model_type") == "mllama"

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    def chat_prompt(self, conversation: Conversation) -> list[int]:
        """The checkpoint's own chat template over transformers' message dicts: images as
        {"type": "image"} parts where the client put them, so the template writes <|image|> there; an
        assistant's tool calls with their arguments as objects (the template writes them as JSON); the
        tools offered as `tools`."""
        messages = [self._message(m, bool(conversation.tools)) for m in conversation.messages]
        try:
            ids = self.tokenizer.render(messages, list(conversation.tools))
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception(...) says why
            raise PromptError(f"the chat template refused the conversation: {e}") from None
        marks = ids.count(self.decoder.cfg.image_token_id)
        if marks != len(conversation.images):
            hint = (" (Llama 3.2's template writes the tools into the first user message as text: put the images "
                    "in a later user message)" if conversation.tools else "")
            raise PromptError(f"the chat template placed {marks} <|image|> tokens for {len(conversation.images)} "
                              f"images{hint}")
        return ids

    @staticmethod
    def _message(message: Message, tools: bool) -> dict:
        if message.tool_calls:
            return {"role": "assistant", "content": message.text,
                    "tool_calls": [{"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                   for c in message.tool_calls]}
        if message.role != "user":
            return {"role": message.role, "content": message.text}
        if tools and not message.images:  # the template reads the first user message as a string when tools are given
            return {"role": "user", "content": message.text}
        return {"role": "user", "content": [{"type": "image"} if isinstance(p, ImageRef) else {"type": "text", "text": p}
                                            for p in message.parts]}
