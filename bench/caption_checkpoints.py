"""Random-weight image-to-text checkpoints as transformers saves them, built offline: BLIP captioning
and VisionEncoderDecoder (ViT / DeiT / Swin / DonutSwin encoders with GPT-2 or TrOCR decoders), each
with a word-level tokenizer built with `tokenizers` and its image processor's preprocessor_config.json.

    write_blip(path, TINY_BLIP)                         # tests
    write_ved(path, "vit", "gpt2", TINY_VED)            # tests
    write_blip(path, BASE["blip"]) ...                  # bench.captioning: the published base shapes

A random GPT-2 with tied embeddings and bos == eos predicts its start token again and stops at once,
so every VED here gets a start token of its own (`START`), distinct from its end token.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "<s>", "</s>"]
PAD, UNK, CLS, SEP, MASK, DEC, START, END = range(len(SPECIALS))
WORDS = ("a an the of on in with and at to is are two three red green blue yellow black white small large "
         "big little picture photo image of man woman dog cat car tree house street sign text page table "
         "circle square triangle left right above below next sitting standing holding near front back").split()


def word_tokenizer(vocab_size: int, bert: bool = False):
    """A transformers fast tokenizer over a word-level `tokenizers` model: SPECIALS, WORDS, then
    filler words up to `vocab_size`. `bert`: wraps text in [CLS] ... [SEP] as BERT's does (BLIP)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(WORDS))
    vocab = {w: i for i, w in enumerate(SPECIALS + words + [f"w{i}" for i in range(vocab_size)])}
    vocab = {w: i for w, i in vocab.items() if i < vocab_size}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if bert:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS),
                                                                                                      ("[SEP]", SEP)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Weights larger than transformers' 0.02 init, so greedy choices are decisive: norms near 1, biases
    O(0.1), embeddings O(0.5), matrices fan-in scaled."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower() or name.endswith("ln_f.weight") or ".ln_" in name) \
                    and name.endswith("weight"):
                values = 1.0 + 0.2 * torch.randn(p.shape, generator=generator)
            elif p.ndim == 1:
                values = 0.1 * torch.randn(p.shape, generator=generator)
            elif ("embed" in name or "wte" in name or "wpe" in name) and "patch" not in name:
                values = 0.5 * torch.randn(p.shape, generator=generator)
            else:
                values = 1.5 * p[0].numel() ** -0.5 * torch.randn(p.shape, generator=generator)
            p.copy_(values)


TINY_BLIP = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8),
             "text": dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64),
             "image_size": 32}
ENCODERS = {
    "vit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8),
    "deit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8),
    "swin": dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
    "donut-swin": dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
}
DECODERS = {
    "gpt2": dict(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "trocr": dict(vocab_size=120, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                  max_position_embeddings=64),
}


def _image_processor(kind: str, image_size: int):
    from transformers import BlipImageProcessor, DeiTImageProcessor, DonutImageProcessor, ViTImageProcessor

    size = {"height": image_size, "width": image_size}
    if kind == "blip":
        return BlipImageProcessor(size=size)
    if kind == "deit":
        return DeiTImageProcessor(size={"height": image_size + 8, "width": image_size + 8}, crop_size=size)
    if kind == "donut-swin":
        return DonutImageProcessor(size=size)
    return ViTImageProcessor(size=size)


def write_blip(path: str | Path, shapes: dict = TINY_BLIP, seed: int = 0) -> torch.nn.Module:
    """A BlipForConditionalGeneration checkpoint (config, weights, tokenizer, preprocessor_config.json)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    path = Path(path)
    text = dict(shapes["text"], bos_token_id=DEC, pad_token_id=PAD, sep_token_id=SEP, eos_token_id=SEP)
    config = BlipConfig(text_config=text, vision_config=shapes["vision"])
    config.text_config.encoder_hidden_size = shapes["vision"]["hidden_size"]
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    randomise_(model, seed)
    model.text_decoder.cls.predictions.decoder.weight = model.text_decoder.bert.embeddings.word_embeddings.weight
    model.save_pretrained(path)
    word_tokenizer(shapes["text"]["vocab_size"], bert=True).save_pretrained(path)
    _image_processor("blip", shapes["vision"]["image_size"]).save_pretrained(path)
    return model


def write_ved(path: str | Path, encoder: str, decoder: str, encoder_shape: dict | None = None,
              decoder_shape: dict | None = None, image_size: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A VisionEncoderDecoderModel checkpoint: `encoder` one of ENCODERS, `decoder` one of DECODERS."""
    from transformers import AutoConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    path = Path(path)
    enc = AutoConfig.for_model(encoder, **(encoder_shape or ENCODERS[encoder]))
    dec_kwargs = dict(decoder_shape or DECODERS[decoder], is_decoder=True, add_cross_attention=True,
                      bos_token_id=START, eos_token_id=END, pad_token_id=PAD, decoder_start_token_id=START)
    if decoder == "trocr":
        dec_kwargs.setdefault("cross_attention_hidden_size", enc.hidden_size)
    dec = AutoConfig.for_model(decoder, **dec_kwargs)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = START, PAD, END
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config).eval()
    randomise_(model, seed)
    model.generation_config.decoder_start_token_id = START
    model.generation_config.eos_token_id = END
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = START
    model.save_pretrained(path)
    word_tokenizer(dec.vocab_size).save_pretrained(path)
    _image_processor(encoder, image_size or enc.image_size).save_pretrained(path)
    return model


# The published base shapes (random weights): Salesforce/blip-image-captioning-base,
# nlpconnect/vit-gpt2-image-captioning, microsoft/trocr-base-handwritten
VIT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
BASE_BLIP = {"vision": dict(VIT_BASE, image_size=384, layer_norm_eps=1e-5),
             "text": dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=512)}
BASE_VED = {
    "vit-gpt2": ("vit", "gpt2", dict(VIT_BASE, image_size=224),
                 dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
    "trocr": ("vit", "trocr", dict(VIT_BASE, image_size=384, qkv_bias=False),
              dict(vocab_size=50265, d_model=1024, decoder_layers=12, decoder_attention_heads=16,
                   decoder_ffn_dim=4096, max_position_embeddings=512, layernorm_embedding=True,
                   scale_embedding=False, use_learned_position_embeddings=True)),
}


def write_base(path: str | Path, family: str, seed: int = 0) -> None:
    """One of the benchmark's base checkpoints: "blip", "vit-gpt2" or "trocr"."""
    if family == "blip":
        write_blip(path, BASE_BLIP, seed)
    else:
        encoder, decoder, enc, dec = BASE_VED[family]
        write_ved(path, encoder, decoder, enc, dec, seed=seed)
