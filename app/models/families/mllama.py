"""The Llama-3.2-Vision family: a Hugging Face `MllamaForConditionalGeneration` directory as the hub
lays it out.

    config.json, *.safetensors (+ model.safetensors.index.json), tokenizer.json + tokenizer_config.json,
    the chat template (tokenizer_config.json, chat_template.json or chat_template.jinja),
    preprocessor_config.json, generation_config.json
      -> MllamaDecoder (llm/models/mllama.py), MllamaVisionEncoder (vision/encoders/mllama.py),
         HFChatTokenizer (llm/loading/chat_template.py), stop ids from the generation config

Several images per conversation, in any user turn, and text-only conversations; no contrastive towers
(no embeddings, no zero-shot labels).
"""

from __future__ import annotations

from pathlib import Path

from app.chat.conversation import Conversation, ImageRef
from app.models.capabilities import Capabilities
from app.models.families.base import PromptError
from llm.loading.chat_template import HFChatTokenizer
from llm.loading.errors import ModelDirError
from llm.loading.hf import file_digest, generation_stop_ids, load_tensors, read_config, read_json, safetensors_files
from llm.models.mllama import MllamaDecoder, mllama_from_hf_dir
from vision.encoders.mllama import VISION_PREFIXES, MllamaVisionEncoder

FAMILY = "mllama"
ARCHITECTURE = "MllamaForConditionalGeneration"
MAX_IMAGES = 1 << 16  # no limit of the family's own: the server's max_images_per_request applies


class MllamaModel:
    family = FAMILY
    labels: tuple[str, ...] = ()
    contrastive = None

    def __init__(self, path: str | Path, max_context: int | None = None) -> None:
        path = Path(path)
        config = read_config(path)
        if ARCHITECTURE not in config.get("architectures", []) and config.get("model_type") != "mllama":
            raise ModelDirError(f"{path / 'config.json'} is not a {ARCHITECTURE} checkpoint")
        preprocess = read_json(path / "preprocessor_config.json")
        self.name = path.name
        self.tokenizer = HFChatTokenizer(path)
        self.weights_digest = file_digest(safetensors_files(path))
        self.decoder: MllamaDecoder = mllama_from_hf_dir(path, max_context)
        self.encoder = MllamaVisionEncoder.from_state(config["vision_config"], load_tensors(path, VISION_PREFIXES),
                                                      preprocess, self.name)
        self.stop_ids = generation_stop_ids(path, config)
        image_token = self.decoder.cfg.image_token_id
        if self.tokenizer.token_id("<|image|>") not in (None, image_token):
            raise ModelDirError(f"{path}: the tokenizer's <|image|> is not config.json's image_token_index "
                                f"{image_token}")
        self.capabilities = Capabilities(questions=True, captions=True, max_images=MAX_IMAGES, text_only=True,
                                         embeddings=False, zero_shot=False)

    @classmethod
    def load(cls, path: Path, max_context: int | None = None) -> "MllamaModel":
        return cls(path, max_context)

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
        {"type": "image"} parts where the client put them, so the template writes <|image|> there."""
        messages = []
        for message in conversation.messages:
            if message.role == "user":
                content = [{"type": "image"} if isinstance(p, ImageRef) else {"type": "text", "text": p}
                           for p in message.parts]
                messages.append({"role": "user", "content": content})
            else:
                messages.append({"role": message.role, "content": message.text})
        try:
            ids = self.tokenizer.render(messages)
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception(...) says why
            raise PromptError(f"the chat template refused the conversation: {e}") from None
        marks = ids.count(self.decoder.cfg.image_token_id)
        if marks != len(conversation.images):
            raise PromptError(f"the chat template placed {marks} <|image|> tokens for {len(conversation.images)} "
                              f"images")
        return ids
