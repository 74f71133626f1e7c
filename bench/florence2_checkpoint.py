"""Random-weight Florence-2 checkpoints laid out as the hub's `florence-community/Florence-2-base` lays
them out, built offline through transformers' own `save_pretrained`:

- config.json (Florence2Config: a DaViT vision tower, a BART text config) and model.safetensors;
- generation_config.json: decoder_start_token_id </s>, forced_bos_token_id <s>, forced_eos_token_id and
  eos </s>, pad <pad> (BART's rules, which Florence-2 inherits);
- tokenizer.json + tokenizer_config.json: a BART-style byte-level BPE trained here on the Python standard
  library's sources (nothing downloaded): <s> <pad> </s> <unk> first, <mask> after the merges, then
  Florence-2's location tokens (<loc_0>...) and `<image>` last, the image token (`extra_special_tokens`);
- preprocessor_config.json (CLIPImageProcessor: square resize, no crop, ImageNet mean/std, bicubic,
  `image_seq_length` = the tower's tokens) and processor_config.json (Florence2Processor).

`base` is Florence-2-base's published shape (DaViT depths 1/1/9/1, widths 128-1024, 768 px; BART 6+6 x
768); its text vocabulary is the hub tokenizer's 51289 ids plus `<image>`. `python -m
bench.florence2_checkpoint DIR [--preset base]`. (bench/donut_checkpoint.py builds Donut on the same BPE.)
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from bench.hf_checkpoints import randomise_, training_text

BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

TINY_VISION = dict(depths=[1, 1, 1, 1], embed_dim=[16, 24, 32, 48], num_heads=[1, 2, 2, 3], num_groups=[1, 2, 2, 3],
                   window_size=2, projection_dim=32, drop_path_rate=0.0, max_position_embeddings=16)
TINY_TEXT = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0)
BASE_VISION = dict(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                   num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768, drop_path_rate=0.0,
                   max_position_embeddings=50)
BASE_TEXT = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
                 dropout=0.0)
# vocab: BPE ids incl. the 4 specials and <mask>; locs: how many <loc_i> tokens (Florence-2 has 1000)
PRESETS = {"tiny": dict(vision=TINY_VISION, text=TINY_TEXT, image_size=64, bpe_vocab=400, locs=8),
           "base": dict(vision=BASE_VISION, text=BASE_TEXT, image_size=768, bpe_vocab=50265, locs=1000)}
# Florence-2's added tokens besides the locations (its tokenizer adds these after <mask>)
TASK_TOKENS = ("<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>",
               "<grounding>", "</grounding>", "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>",
               "<region_to_desciption>", "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>",
               "<and>")


def image_tokens(vision: dict, image_size: int) -> int:
    """The tower's tokens per image: the (image / 32)^2 grid plus one spatially pooled token."""
    side = image_size // 32
    return side * side + 1


@functools.lru_cache(maxsize=4)
def _bart_style_json(bpe_vocab: int, locs: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab - 1, special_tokens=list(BART_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(max_bytes=max(64 << 10, bpe_vocab * 160)), trainer)
    if tok.get_vocab_size() > bpe_vocab - 1:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {bpe_vocab - 1}")
    # The standard library's text runs out of merges before a 50k vocabulary: the rest are placeholders,
    # so the ids (and the lm_head's size) are those of the real tokenizer.
    tok.add_tokens([f"<unused_{i}>" for i in range(bpe_vocab - 1 - tok.get_vocab_size())])
    tok.add_special_tokens(["<mask>"])
    tok.add_tokens([f"<loc_{i}>" for i in range(locs)] + list(TASK_TOKENS))
    tok.add_special_tokens([IMAGE_TOKEN])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return tok.to_str()


def bart_style_tokenizer(bpe_vocab: int, locs: int):
    """A fresh `tokenizers.Tokenizer` (trained once per shape per process)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_bart_style_json(bpe_vocab, locs))


def write_florence2_checkpoint(path: str | Path, vision: dict, text: dict, image_size: int, bpe_vocab: int,
                               locs: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight Florence-2 checkpoint into `path` (created). Returns the directory."""
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, GenerationConfig)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = bart_style_tokenizer(bpe_vocab, locs)
    vocab = backend.get_vocab_size()
    image_id = backend.token_to_id(IMAGE_TOKEN)
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    config = Florence2Config(vision_config=vision, image_token_id=image_id,
                             text_config={**text, **ids, "vocab_size": vocab, "model_type": "bart",
                                          "scale_embedding": False})
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    randomise_(model, seed)
    model.generation_config = GenerationConfig(**ids, forced_bos_token_id=0)
    model.to(dtype).save_pretrained(path)

    tokenizer = BartTokenizer(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                              cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                              model_max_length=text["max_position_embeddings"],
                              extra_special_tokens={"image_token": IMAGE_TOKEN})
    processor = CLIPImageProcessor(size={"height": image_size, "width": image_size},
                                   crop_size={"height": image_size, "width": image_size}, do_center_crop=False,
                                   resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                   image_seq_length=image_tokens(vision, image_size))
    processor.save_pretrained(path)
    Florence2Processor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_florence2_checkpoint(args.dir, **PRESETS[args.preset], seed=args.seed))


if __name__ == "__main__":
    main()
