"""Random-weight Donut checkpoints, shaped as `naver-clova-ix/donut-base` is, built offline through
transformers' own `save_pretrained`: a VisionEncoderDecoderModel of a DonutSwin encoder and an
MBartForCausalLM decoder (pre-norm, scaled embeddings; a tiny MBart config needs encoder_layers ==
decoder_layers), bench/florence2_checkpoint.py's BART-style BPE with Donut's task and field tokens
(<s_cord-v2>, <s_menu>...) as special tokens, a DonutImageProcessor and a DonutProcessor.

    write_donut_checkpoint(path, **TINY_DONUT)   # tests/test_donut_oracle.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.florence2_checkpoint import bart_style_tokenizer
from bench.hf_checkpoints import randomise_

DONUT_TOKENS = ("<s_cord-v2>", "<s_docvqa>", "<s_question>", "</s_question>", "<s_answer>", "</s_answer>",
                "<s_menu>", "</s_menu>", "<s_nm>", "</s_nm>", "<s_price>", "</s_price>", "<sep/>")
TINY_DONUT = dict(encoder=dict(image_size=[40, 32], patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                               window_size=4),
                  decoder=dict(d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                               encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64,
                               max_position_embeddings=64, scale_embedding=True, dropout=0.0),
                  bpe_vocab=400)


def write_donut_checkpoint(path: str | Path, encoder: dict, decoder: dict, bpe_vocab: int, seed: int = 0) -> Path:
    """Write a random-weight Donut (DonutSwin + MBart) checkpoint into `path` (created). Returns it."""
    from transformers import (BartTokenizer, DonutImageProcessor, DonutProcessor, DonutSwinConfig, GenerationConfig,
                              MBartConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = bart_style_tokenizer(bpe_vocab, 0)
    backend.add_special_tokens(list(DONUT_TOKENS))
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=0)
    enc = DonutSwinConfig(**encoder)
    dec = MBartConfig(**decoder, **ids, vocab_size=backend.get_vocab_size(), is_decoder=True, add_cross_attention=True,
                      forced_eos_token_id=2)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config).eval()
    randomise_(model, seed)
    model.generation_config = GenerationConfig(**ids, forced_eos_token_id=2)
    model.save_pretrained(path)
    tokenizer = BartTokenizer(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                              cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                              additional_special_tokens=list(DONUT_TOKENS),
                              model_max_length=decoder["max_position_embeddings"])
    height, width = encoder["image_size"]
    processor = DonutImageProcessor(size={"height": height, "width": width})
    processor.save_pretrained(path)
    DonutProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path
