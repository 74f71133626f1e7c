"""`mmserve train-demo`: train the bundled demo model on the synthetic world, seeded and reproducible.

Recipe (from the feasibility prototype in ../shared/README.md): open_clip CoCa with a small CNN tower
(8x8 = 64 visual tokens of width 128), batch 64, AdamW lr 2e-3 cosine to zero. Loss = 2 x cross-entropy
on the answer tokens only (open_clip's CoCaLoss would also score the question tokens) + a 12-way
cross-entropy of the image latent against the text-tower latents of the 12 zero-shot labels (the
standard contrastive loss is noisy here: a batch of 64 holds many duplicates of 12 labels).

The tower has one mixer block (self-attention over its 64 tokens) so that the decoder can tell which
colour belongs to which shape. With `init`, a checkpoint trained without one grows it (starting as the
identity) and, with `freeze=("cnn", "text")`, learns it cheaply: the conv features of each pre-rendered
image are computed once, and only the mixer, the tower's pooling head and the decoder train. The
bundled checkpoint was made that way from the mixer-less one (README, "The demo model").
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from demo import world
from demo.model import LABEL_PROMPT, MIXER_LAYERS, demo_spec
from llm.loading.chat_format import ChatFormat, Turn
from app.models.families.coca import build_coca, load_coca
from llm.loading.coca_checkpoint import save_model_dir
from llm.loading.tokenizers import WordTokenizer
from vision.preprocess import PreprocessCfg, normalize_uint8, to_pixels
from vision.reduce import ReductionSpec, reduce

# A batch is all single-turn or all multi-turn (2-3 turns): padding a batch of short single-turn
# sequences to the length of one three-turn conversation would triple the text tower's work.
MULTI_TURN_BATCHES = 0.2
# Reduced-token batches (with `reduce_share`): the decoder learns to answer from 1/2, 1/4 and 1/8 of
# its visual tokens as the vision stage's reductions make them, so `visual_tokens` costs little accuracy.
REDUCTIONS = tuple((method, ratio) for method in ("keep", "tome") for ratio in (0.5, 0.25, 0.125))
FREEZABLE = ("cnn", "text")


@dataclass(frozen=True)
class TrainCfg:
    out: Path
    steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.05
    images: int = 48_000  # pre-rendered pool
    seed: int = 0
    threads: int = 2
    init: Path | None = None  # fine-tune this checkpoint instead of starting from scratch
    reduce_share: float = 0.0  # share of batches whose visual tokens are reduced (see REDUCTIONS)
    decoder_only: bool = False  # train the multimodal decoder alone: the contrastive towers (zero-shot) stay as they are
    # Transformer blocks over the tower's tokens; None: MIXER_LAYERS from scratch, the checkpoint's own
    # with `init`. A checkpoint with fewer grows the missing blocks, starting as the identity.
    mixer_layers: int | None = None
    # Parts that stay as they are: "cnn" (the tower's conv stages: their features are computed once per
    # pre-rendered image, ~2.4x cheaper steps) and "text" (the text tower and logit scale).
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mixer_layers is not None and self.mixer_layers < 0:
            raise ValueError(f"mixer_layers must be >= 0, got {self.mixer_layers}")
        if unknown := set(self.freeze) - set(FREEZABLE):
            raise ValueError(f"freeze: unknown part(s) {sorted(unknown)}; choose from {', '.join(FREEZABLE)}")


def sample_conversation(scene: world.Scene, rng: random.Random, n_turns: int) -> list[Turn]:
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for q, a in world.questions(scene):
        by_kind.setdefault(world.question_kind(q), []).append((q, a))
    turns = []
    for _ in range(n_turns):
        kind = "caption" if rng.random() < 0.35 else rng.choice(list(by_kind))
        q, a = rng.choice(by_kind[kind])
        turns.append(Turn(q, a))
    return turns


def _batch_tokens(convs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(c.ids) for c in convs)
    ids = torch.full((len(convs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(convs), length), dtype=torch.bool)
    for i, c in enumerate(convs):
        ids[i, : len(c.ids)] = torch.tensor(c.ids)
        mask[i, : len(c.ids)] = torch.tensor(c.answer_mask, dtype=torch.bool)
    return ids, mask


def _with_finetune(history: dict, run: dict) -> dict:
    """The init checkpoint's training record with one more fine-tune: {base run..., "finetunes": [...]}
    (records written before there could be several hold one under "finetune")."""
    earlier = history.get("finetunes", [history["finetune"]] if "finetune" in history else [])
    base = {k: v for k, v in history.items() if k not in ("finetune", "finetunes")}
    return {**base, "finetunes": [*earlier, run]}


def train(cfg: TrainCfg) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    if cfg.init is not None:
        loaded = load_coca(cfg.init)
        tokenizer, model, history = loaded.tokenizer, loaded.model.train(), loaded.spec.extra.get("training", {})
        if cfg.mixer_layers is not None and model.visual.cfg.mixer_layers < cfg.mixer_layers:
            model.visual = model.visual.grow_mixer(cfg.mixer_layers).train()
    else:
        tokenizer = WordTokenizer.build(world.vocabulary())
        model, history = build_coca(demo_spec(tokenizer.vocab_size, mixer_layers=MIXER_LAYERS if cfg.mixer_layers is None
                                                  else cfg.mixer_layers)).train(), {}
    mixer_layers = model.visual.cfg.mixer_layers
    fmt = ChatFormat(tokenizer)
    pp = PreprocessCfg.from_dict(demo_spec(tokenizer.vocab_size, mixer_layers=mixer_layers).preprocess)
    grid = tuple(model.visual.grid_size)
    model.visual.to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU

    scenes = [world.sample_scene(rng) for _ in range(cfg.images)]
    pixels = torch.empty((cfg.images, 3, pp.image_size, pp.image_size), dtype=torch.uint8)
    for i, scene in enumerate(tqdm(scenes, desc="rendering", unit="img", mininterval=2)):
        pixels[i] = to_pixels(world.render(scene), pp)
    label_index = {label: i for i, label in enumerate(world.LABELS)}
    label_ids = torch.tensor([[tokenizer.sot_id, *tokenizer.encode(LABEL_PROMPT.format(label=l)), tokenizer.eot_id]
                              for l in world.LABELS])

    frozen_prefixes = {"cnn": ("visual.stages.",), "text": ("text.", "logit_scale")}
    for name, p in model.named_parameters():
        if cfg.decoder_only:
            p.requires_grad_(name.startswith("text_decoder."))
        elif name.startswith(tuple(prefix for part in cfg.freeze for prefix in frozen_prefixes[part])):
            p.requires_grad_(False)
    features = None
    if "cnn" in cfg.freeze:  # eval-mode BatchNorm, as served: one forward per image, not one per draw
        model.visual.stages.eval()
        with torch.no_grad():
            features = torch.cat([model.visual.stages(normalize_uint8(pixels[i:i + 256], pp)
                                                      .contiguous(memory_format=torch.channels_last))
                                  for i in range(0, cfg.images, 256)])
    with torch.no_grad():  # a frozen text tower's label latents are constants
        fixed_label_latents = model.encode_text(label_ids, normalize=True) if "text" in cfg.freeze else None
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trained if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    start = time.monotonic()
    bar = tqdm(range(cfg.steps), desc="training", unit="step", mininterval=2)
    for step in bar:
        if cfg.decoder_only:
            model.visual.eval()  # frozen: BatchNorm statistics must not drift either
        elif "cnn" in cfg.freeze:
            model.visual.stages.eval()
        idx = [rng.randrange(cfg.images) for _ in range(cfg.batch_size)]
        multi_turn = rng.random() < MULTI_TURN_BATCHES
        convs = [fmt.encode(sample_conversation(scenes[i], rng, rng.choice((2, 3)) if multi_turn else 1))
                 for i in idx]
        text, answer_mask = _batch_tokens(convs, tokenizer.pad_id)
        if features is not None:
            latent, tokens = model.visual.head(features[idx])
        else:
            latent, tokens = model.visual(normalize_uint8(pixels[idx], pp).contiguous(memory_format=torch.channels_last))
        latent = F.normalize(latent, dim=-1)  # as CoCa._encode_image returns it
        if rng.random() < cfg.reduce_share:
            method, ratio = rng.choice(REDUCTIONS)
            query = model.visual.pool_query.detach() if method == "keep" else None
            tokens = reduce(tokens, ReductionSpec(method, ratio), grid=grid, pooled=query)
        out = model(None, text, image_latent=latent, image_embs=tokens)
        logits, labels = out["logits"], out["labels"]
        target_mask = answer_mask[:, 1:]
        caption_loss = F.cross_entropy(logits[target_mask], labels[target_mask])

        loss = 2.0 * caption_loss
        if not cfg.decoder_only:
            label_latents = (fixed_label_latents if fixed_label_latents is not None
                             else model.encode_text(label_ids, normalize=True))
            targets = torch.tensor([label_index.get(world.zero_shot_label(scenes[i]), -100) for i in idx])
            zs_logits = out["logit_scale"] * out["image_features"] @ label_latents.T
            loss = loss + F.cross_entropy(zs_logits, targets, ignore_index=-100)

        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        opt.step()
        if step % 20 == 0:
            token_acc = (logits[target_mask].argmax(-1) == labels[target_mask]).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", answer_tok_acc=f"{token_acc:.3f}")

    minutes = (time.monotonic() - start) / 60
    run = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "images": cfg.images,
           "reduce_share": cfg.reduce_share, "decoder_only": cfg.decoder_only, "mixer_layers": mixer_layers,
           "freeze": list(cfg.freeze),
           "minutes": round(minutes, 1)}
    record = run if cfg.init is None else _with_finetune(history, run)
    spec = demo_spec(tokenizer.vocab_size, extra={"training": record}, mixer_layers=mixer_layers)
    save_model_dir(cfg.out, spec, model.eval(), tokenizer)
    return {"minutes": minutes, "out": str(cfg.out)}
