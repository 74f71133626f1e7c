"""Random-weight Llama-3.2-Vision (Mllama) checkpoints laid out as the hub lays them out, built offline.

`write_mllama_checkpoint(dir, **PRESETS["tiny"])` writes what `meta-llama/Llama-3.2-11B-Vision-Instruct`
holds, at a size this machine can run, through transformers' own `save_pretrained` wherever it has one:
- config.json (MllamaConfig) and model.safetensors (or shards + model.safetensors.index.json);
- generation_config.json: bos <|begin_of_text|>, eos [<|end_of_text|>, <|eom_id|>, <|eot_id|>], pad
  <|finetune_right_pad_id|>, and the hub's sampling defaults (do_sample, temperature 0.6, top_p 0.9);
- tokenizer.json + tokenizer_config.json: a byte-level BPE trained here on the Python standard library's
  sources (nothing downloaded), Llama 3's pre-tokenizer and post-processor (the tokenizer adds
  <|begin_of_text|>), its 256 reserved special tokens as the last 256 ids of the text vocabulary, and
  `<|image|>` at id = vocab_size = image_token_index: the first of the 8 extra embedding rows, as 128256 is
  in Llama 3.2;
- preprocessor_config.json (MllamaImageProcessor) and processor_config.json (MllamaProcessor);
- the chat template (bench/llama32_vision_chat_template.jinja: Llama 3.2 Vision Instruct's format) in the
  place `template_file` names: chat_template.json (the default: the hub repo's own, a legacy processor
  file), chat_template.jinja (transformers 5's own) or tokenizer_config.json. transformers 5.24's
  processor reads the first two only: with the template in tokenizer_config.json alone, the tokenizer's
  apply_chat_template works and the processor's raises "does not have a chat template".

The weights follow tests/test_mllama_oracle.py's random_mllama: every tensor random, fan-in scaled so the
activations stay O(1), and the tanh gates (zero at init) opened so cross-attention really counts.
Building the 125M preset takes ~20 s here; `python -m bench.hf_checkpoints DIR [--preset 125m]`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sysconfig
from pathlib import Path

import torch

from bench.models import MLLAMA_TEXT, MLLAMA_TILE, MLLAMA_VISION

CHAT_TEMPLATE = Path(__file__).with_name("llama32_vision_chat_template.jinja")
TEMPLATE_FILES = ("tokenizer_config", "chat_template.json", "chat_template.jinja")

# Llama 3's special tokens: 256 ids after the BPE vocabulary, in this order (<|begin_of_text|> = 128000 there)
NAMED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPECIALS = NAMED_SPECIALS + tuple(f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - 11))
IMAGE_TOKEN = "<|image|>"
# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern), before the byte-level mapping
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0}
# tiny: seconds to build and load; 28-pixel tiles of 14-pixel patches (as tests/test_mllama_oracle.py)
TINY_TEXT = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, cross_attention_layers=[1, 3], max_position_embeddings=2048,
                 rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 256})
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
                   vision_output_dim=96, image_size=28, patch_size=14, max_num_tiles=4,
                   intermediate_layers_indices=[0, 1])
PRESETS = {"tiny": {"text": TINY_TEXT, "vision": TINY_VISION},
           "125m": {"text": MLLAMA_TEXT, "vision": MLLAMA_VISION}}  # bench/models.py's: 32k vocab, tile 56
assert MLLAMA_VISION["image_size"] == MLLAMA_TILE


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Every special token's id in a checkpoint of this text vocabulary size."""
    first = vocab_size - len(LLAMA3_SPECIALS)
    return {**{name: first + i for i, name in enumerate(LLAMA3_SPECIALS)}, IMAGE_TOKEN: vocab_size}


def training_text(max_bytes: int) -> list[str]:
    """Text to train the BPE on, found offline: the standard library's sources, sorted, up to max_bytes."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= max_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
    return texts


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    return _train_llama3_style_tokenizer(vocab_size).to_str()


def llama3_style_tokenizer(vocab_size: int):
    """A fresh `tokenizers.Tokenizer` (the training is done once per vocabulary size per process)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json(vocab_size))


def _train_llama3_style_tokenizer(vocab_size: int):
    """A `tokenizers.Tokenizer` shaped as Llama 3's tokenizer.json: byte-level BPE over the cl100k split,
    merges ignored for whole-word hits, <|begin_of_text|> added by the post-processor; ids
    [0, vocab_size - 256) are BPE tokens, then the 256 specials, then <|image|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe_size = vocab_size - len(LLAMA3_SPECIALS)
    if bpe_size < 256 + 64:
        raise ValueError(f"vocab_size {vocab_size} leaves {bpe_size} BPE ids: need 256 bytes + 64 merges at least")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(max_bytes=max(1 << 20, bpe_size * 160)), trainer)
    if tok.get_vocab_size() != bpe_size:  # the special ids must land where the config says they are
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {bpe_size}: more text needed")
    tok.add_special_tokens([*LLAMA3_SPECIALS, IMAGE_TOKEN])
    ids = special_token_ids(vocab_size)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, ids[bos])])])
    assert all(tok.token_to_id(name) == i for name, i in ids.items())
    return tok


def randomise_(model, seed: int) -> None:
    """tests/test_mllama_oracle.py's initialisation: norms near 1, biases and embeddings O(1), projections
    fan-in scaled, and the tanh gates (zero, i.e. closed, at init) opened."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                values = torch.rand(p.shape, generator=generator) * 3 - 1.5
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                values = 1.0 + 0.2 * torch.randn(p.shape, generator=generator)
            elif p.ndim == 1:  # biases, class embedding
                values = 0.2 * torch.randn(p.shape, generator=generator)
            elif "embed" in name and "patch" not in name:  # token, position and tile embeddings
                values = 0.5 * torch.randn(p.shape, generator=generator)
            else:
                values = 1.5 * p[0].numel() ** -0.5 * torch.randn(p.shape, generator=generator)
            p.copy_(values)


def write_mllama_checkpoint(path: str | Path, text: dict, vision: dict, seed: int = 0,
                            max_shard_size: str | int | None = None, template_file: str = "chat_template.json",
                            dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random-weight Llama-3.2-Vision-Instruct-shaped checkpoint into `path` (created; files in it
    replaced). `text`/`vision`: MllamaTextConfig/MllamaVisionConfig fields (PRESETS); `max_shard_size`:
    as save_pretrained takes it ("100KB"), None = one file; `template_file`: one of TEMPLATE_FILES;
    `dtype`: of the stored weights (bfloat16 as the hub's). Returns the directory."""
    from transformers import (GenerationConfig, MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor,
                              MllamaProcessor, PreTrainedTokenizerFast)
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if template_file not in TEMPLATE_FILES:
        raise ValueError(f"template_file must be one of {TEMPLATE_FILES}, got {template_file!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in ("chat_template.json", "chat_template.jinja", "model.safetensors.index.json"):
        (path / stale).unlink(missing_ok=True)
    for shard in path.glob("model*.safetensors"):
        shard.unlink()

    vocab = text["vocab_size"]
    ids = special_token_ids(vocab)
    bos, pad = ids["<|begin_of_text|>"], ids["<|finetune_right_pad_id|>"]
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    config = MllamaConfig(vision_config=vision, image_token_index=ids[IMAGE_TOKEN],
                          text_config={**text, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    randomise_(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                                               do_sample=True, temperature=0.6, top_p=0.9)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size or "1000GB")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=llama3_style_tokenizer(vocab), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", model_max_length=text["max_position_embeddings"],
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=True)
    tile = vision["image_size"]
    image_processor = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=vision["max_num_tiles"],
                                           image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    image_processor.save_pretrained(path)  # preprocessor_config.json, as the hub repo has it
    MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)

    template = CHAT_TEMPLATE.read_text()
    if template_file == "tokenizer_config":  # as the hub's Llama 3 text models carry it
        tokenizer.chat_template = template
        tokenizer.save_pretrained(path, save_jinja_files=False)
    elif template_file == "chat_template.json":  # the legacy processor file the Llama 3.2 Vision repo has
        (path / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    else:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(path)  # transformers 5 writes a single template as chat_template.jinja
    _as_the_hub_names_it(path / "tokenizer_config.json")
    return path


def _as_the_hub_names_it(tokenizer_config: Path) -> None:
    """transformers 5 saves tokenizer_class "TokenizersBackend" and a "backend" key; the hub's Llama 3.2
    files (written by transformers 4) say "PreTrainedTokenizerFast", which transformers 5 still reads."""
    fields = json.loads(tokenizer_config.read_text())
    fields.pop("backend", None)
    fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None, help='e.g. "200MB"; default: one file')
    parser.add_argument("--template-file", choices=TEMPLATE_FILES, default="chat_template.json")
    args = parser.parse_args()
    out = write_mllama_checkpoint(args.dir, **PRESETS[args.preset], seed=args.seed,
                                  max_shard_size=args.max_shard_size, template_file=args.template_file)
    print(out)


if __name__ == "__main__":
    main()
