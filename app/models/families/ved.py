"""The VisionEncoderDecoderModel family: a Hugging Face directory whose config.json names
VisionEncoderDecoderModel (ViT-GPT2 captioners, TrOCR, Donut...).

    config.json (encoder + decoder sections), *.safetensors, tokenizer files, preprocessor_config.json,
    generation_config.json
      -> HFVisionEncoder (vision/encoders/hf_vision.py: ViT, DeiT, Swin, DonutSwin + enc_to_dec_proj),
         the decoder from llm/models/ved.py's VED_DECODERS by the decoder's model_type,
         HFTextTokenizer, the start token (decoder_start_token_id) and end tokens (eos_token_id)

The prompt is the start token, then the request's text (a task prompt such as Donut's `<s_cord-v2>`,
or a caption prefix) as the tokenizer encodes it; as transformers' generate, the start token is not
added again when the text already begins with it, nor before a Donut's (donut-swin encoder's) text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.chat.conversation import Conversation
from app.models.families.captioner import CAPTIONER, caption_prompt_text, required_id, stop_ids, with_dtype
from llm.loading.errors import ModelDirError
from llm.loading.hf import file_digest, load_tensors, read_config, read_json, safetensors_files
from llm.loading.hf_text_tokenizer import HFTextTokenizer
from llm.models.ved import VED_DECODERS
from vision.encoders.hf_vision import VED_ENCODERS, ved_encoder

FAMILY = "ved"
ARCHITECTURE = "VisionEncoderDecoderModel"


class VEDModel:
    family = FAMILY
    labels: tuple[str, ...] = ()
    contrastive = None
    vocabulary = None
    tool_format = None
    capabilities = CAPTIONER

    def __init__(self, path: str | Path, max_context: int | None = None) -> None:
        path = Path(path)
        raw = read_config(path)
        encoder_type = raw.get("encoder", {}).get("model_type")
        decoder_type = raw.get("decoder", {}).get("model_type")
        if encoder_type not in VED_ENCODERS:
            raise ModelDirError(f"{path / 'config.json'}: {ARCHITECTURE} encoder {encoder_type!r} is not supported; "
                                f"supported: {', '.join(VED_ENCODERS)}")
        if decoder_type not in VED_DECODERS:
            raise ModelDirError(f"{path / 'config.json'}: {ARCHITECTURE} decoder {decoder_type!r} is not supported; "
                                f"supported: {', '.join(VED_DECODERS)}")
        from transformers import VisionEncoderDecoderConfig  # noqa: PLC0415

        config = VisionEncoderDecoderConfig.from_dict(raw)
        tensors = load_tensors(path, ("decoder.", "enc_to_dec_proj."))
        self.name = path.name
        self.dtype = torch.float32  # as loaded; with_dtype converts
        self.weights_digest = file_digest(safetensors_files(path))
        self.tokenizer = HFTextTokenizer(path)
        preprocess = read_json(path / "preprocessor_config.json")
        self.encoder = ved_encoder(path, preprocess, self.name, self.weights_digest)
        width = (raw["decoder"].get("hidden_size") or raw["decoder"].get("n_embd") or raw["decoder"].get("d_model")
                 if "enc_to_dec_proj.weight" in tensors else config.encoder.hidden_size)
        decoder_tensors = {k.removeprefix("decoder."): v for k, v in tensors.items() if k.startswith("decoder.")}
        try:
            self.decoder = VED_DECODERS[decoder_type](raw["decoder"], decoder_tensors, int(width), max_context)
        except (KeyError, ValueError) as e:
            raise ModelDirError(f"{path}: the {decoder_type} decoder cannot be built: {e}") from None
        self.start_id = required_id(path, raw, "decoder_start_token_id", "decoder")
        # transformers' generate starts a Donut (donut-swin encoder) decoder at its task prompt as given,
        # never adding the start token (generation/utils.py, PR #31470): the task token is its start.
        self.prompt_is_start = encoder_type == "donut-swin"
        self.stop_ids = stop_ids(path, raw, "eos_token_id", "decoder")

    @classmethod
    def load(cls, path: Path, max_context: int | None = None, dtype: torch.dtype = torch.float32) -> "VEDModel":
        return cls(path, max_context).with_dtype(dtype)

    def with_dtype(self, dtype: torch.dtype) -> "VEDModel":
        return with_dtype(self, dtype)

    @staticmethod
    def detect(path: Path) -> bool:
        try:
            config = read_config(path)
        except ModelDirError:
            return False
        return ARCHITECTURE in config.get("architectures", []) or config.get("model_type") == "vision-encoder-decoder"

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    def prompt_ids(self, text: str = "") -> list[int]:
        ids = self.tokenizer.encode(text) if text else []
        return ids if ids[:1] == [self.start_id] or (ids and self.prompt_is_start) else [self.start_id, *ids]

    def chat_prompt(self, conversation: Conversation) -> list[int]:
        return self.prompt_ids(caption_prompt_text(conversation))
