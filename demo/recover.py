"""A short recovery fine-tune of a pruned demo decoder: a few minutes win back what pruning cost.

    python -m demo.recover PRUNED_DIR [--teacher models/demo] [--minutes 4] [--out DIR]

Pruning (llm/quant/prune.py, `mmserve quantize --prune`) drops the least important heads and MLP
channels at once; the rest of the network was trained to lean on them. Recovery trains the pruned
decoder only (the vision tower and the contrastive towers stay frozen, so image features, embeddings
and zero-shot labels don't move) on the demo world, with the loss of `mmserve train-demo` on the answer
tokens plus a distillation term: the KL divergence to the unpruned teacher's answer distribution, which
carries more signal per step than the one-hot answers (Hinton et al., 2015; Sanh et al., 2020 for
pruned transformers). The result overwrites PRUNED_DIR's decoder (or goes to --out, a copy of it).

The decoder is trained through its own modules (llm/models/coca.py) on a dense batch: `DenseBatch`
stands in for the engine's paged StepBatch with plain causal SDPA, so what is trained is exactly what
serves.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from demo import world
from demo.train import _batch_tokens, sample_conversation
from app.models.families.coca import CoCaModel
from llm.loading.chat_format import ChatFormat
from llm.loading.decoder_checkpoint import RECORD_KEY, read_record, save_decoder
from llm.models.coca import CoCaDecoder


class DenseBatch:
    """The two calls a decoder makes of a StepBatch, over dense [B, T] rows: causal self-attention
    among a row's tokens, cross-attention to the row's image K/V. Differentiable, no KV pool."""

    def __init__(self, ids: torch.Tensor, image_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.b, self.t = ids.shape
        self.token_ids = ids.reshape(-1)
        self.positions = torch.arange(self.t).repeat(self.b)
        self.logits_rows = torch.arange(self.b * self.t)
        self.image_visible = None
        self.image_kv = image_kv

    def _rows(self, x: torch.Tensor) -> torch.Tensor:  # [B*T, H, D] -> [B, H, T, D]
        return x.view(self.b, self.t, *x.shape[1:]).transpose(1, 2)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [B*T, H, D]
        return x.transpose(1, 2).reshape(self.b * self.t, *x.shape[1:2], x.shape[-1])

    def self_attention(self, layer: int, q, k, v) -> torch.Tensor:
        return self._flat(F.scaled_dot_product_attention(self._rows(q), self._rows(k), self._rows(v), is_causal=True))

    def cross_attention(self, layer: int, q) -> torch.Tensor:
        k, v = self.image_kv[layer]
        return self._flat(F.scaled_dot_product_attention(self._rows(q), k, v))


def image_kv(decoder: CoCaDecoder, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per cross-attention layer, K and V [B, heads, N, head_dim], with gradients (no pool)."""
    out = []
    b, n, _ = tokens.shape
    for block in decoder.mm_cross:
        kv = block.kv(block.ln_1_kv(tokens)).view(b, n, 2, block.heads, block.head_dim)
        out.append((kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)))
    return out


def dense_logits(decoder: CoCaDecoder, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """ids [B, T] under image tokens [B, N, W] -> logits [B, T, vocab]."""
    return decoder(DenseBatch(ids, image_kv(decoder, tokens))).view(*ids.shape, -1)


def recover(student: CoCaDecoder, teacher: CoCaDecoder, model: CoCaModel, minutes: float, seed: int = 0,
            batch_size: int = 64, lr: float = 5e-4, images: int = 3000, temperature: float = 1.0) -> dict:
    """Train `student` in place for `minutes` (cosine schedule over the steps that fit, estimated from
    the first 20). -> what ran."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    fmt = ChatFormat(model.tokenizer)
    scenes = [world.sample_scene(rng) for _ in range(images)]
    feats = []
    for start in tqdm(range(0, images, 64), desc="image tokens", unit="batch", mininterval=2):
        feats += [f.tokens for f in model.encoder.encode([world.render(s) for s in scenes[start:start + 64]])]
    tokens = torch.stack(feats).clone()  # out of inference mode: autograd may save it
    student.train().float()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    start, step, planned = time.monotonic(), 0, None
    bar = tqdm(desc="recovering", unit="step", mininterval=2)
    while planned is None or step < planned:
        idx = [rng.randrange(images) for _ in range(batch_size)]
        convs = [fmt.encode(sample_conversation(scenes[i], rng, rng.choice((1, 1, 1, 2)))) for i in idx]
        ids, mask = _batch_tokens(convs, model.tokenizer.pad_id)
        inputs, targets, target_mask = ids[:, :-1], ids[:, 1:], mask[:, 1:]
        logits = dense_logits(student, inputs, tokens[idx])[target_mask]
        with torch.no_grad():
            teacher_logits = dense_logits(teacher, inputs, tokens[idx])[target_mask]
        ce = F.cross_entropy(logits, targets[target_mask])
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature ** 2
        loss = ce + kl
        if planned is not None:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / planned)).item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step == 20:  # the pace is known: plan the schedule for the time left
            planned = max(21, int(minutes * 60 / ((time.monotonic() - start) / 20)))
            bar.total = planned
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(ce=f"{ce.item():.3f}", kl=f"{kl.item():.3f}")
    bar.close()
    student.eval()
    for p in params:
        p.requires_grad_(False)
    return {"steps": step, "batch_size": batch_size, "lr": lr, "seed": seed,
            "minutes": round((time.monotonic() - start) / 60, 2), "loss": "answer cross-entropy + KL to the unpruned"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.recover", description=__doc__.splitlines()[0])
    parser.add_argument("pruned", type=Path, help="a pruned, unquantized demo checkpoint (mmserve quantize --prune)")
    parser.add_argument("--teacher", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "demo")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: overwrite PRUNED's decoder")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default; on a machine others load, 1 can be several times faster)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = json.loads((args.pruned / "config.json").read_text())
    record = read_record(config, str(args.pruned / "config.json"))
    if record is None or record.pruning is None or record.quantization is not None:
        raise SystemExit(f"{args.pruned}: expected a pruned, unquantized checkpoint (mmserve quantize --prune, "
                         f"then quantize the recovered one)")
    model = CoCaModel.from_dir(args.pruned)
    teacher = CoCaModel.from_dir(args.teacher).decoder
    run = recover(model.decoder, teacher, model, args.minutes, args.seed)
    out = args.out or args.pruned
    if out != args.pruned:
        shutil.copytree(args.pruned, out)
    config[RECORD_KEY]["recovery"] = run
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_decoder(model.decoder, out, record)
    print(json.dumps({"out": str(out), **run}))


if __name__ == "__main__":
    main()
