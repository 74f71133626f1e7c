"""The staged router: light understanding first, the heavy decoder only when it is needed.

Stage 1 is light: zero-shot labels of the image from the checkpoint's contrastive towers (the image
features the decoder needs anyway, against text latents computed once), and the intent of the
prompt from all-MiniLM-L6-v2 (app/intent.py). Then one of three routes:

- "policy": a configured policy label fires on the image -> a fixed refusal, whatever was asked;
- "stage1": an identification question whose answer the top zero-shot label fully determines, at
  or above the confidence threshold -> the label's object name, phrased as the decoder answers
  ("what shape is the red object?" -> "circle");
- "decoder:<model>": everything else, to the model the configured rules pick.

A label determines the answer only when the prompt refers to the object by nothing the label does
not capture: every label word it names (a colour, a shape) must be the top label's, it must not
name the object it asks to identify, and it must not use a word about size, position or several
objects (app/router_data/stage1.json). With two objects, the zero-shot label is the larger one's,
which is what a prompt without such words can mean. Stage 1 never answers for a caption-only model
with no labels: there is nothing to answer from.

Independent of HTTP: the chat service calls `route_turns`, sends the answer or runs the decoder, and
sets the response header and metrics from the decision's `route`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from app.intent import Intent, IntentClassifier
from app.runtime import ModelRuntime
from app.settings import Settings
from llm.chat_format import Turn
from vision.encoder import ImageFeatures

STAGE1_FILE = Path(__file__).resolve().parent / "router_data" / "stage1.json"
STAGE1_INTENT = "identification"
_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    route: str  # "stage1" | "policy" | "decoder:<model>"; the x-mmserve-route header and metric label
    intent: str  # "" when the router is off
    intent_similarity: float  # cosine of the prompt to its intent's centroid
    intent_margin: float  # over the runner-up intent
    label: str | None  # top zero-shot label, None without labels
    label_confidence: float  # its softmax probability
    answer: str | None = None  # the finished reply for "stage1" and "policy"
    model: str | None = None  # the model to decode with for "decoder:*"
    reason: str = ""  # why this route, in words, for logs
    labels_top: tuple[tuple[str, float], ...] = ()  # the best few labels

    @property
    def finished(self) -> bool:
        """True when `answer` is the reply; False when the decoder `model` must generate it."""
        return self.answer is not None

    def record(self) -> dict:
        return asdict(self)


class ZeroShotClassifier:
    """runtime.classify with the label latents computed once: re-encoding every label on each
    request would cost as much as the decode stage 1 is meant to save."""

    def __init__(self, runtime: ModelRuntime, labels: list[str]) -> None:
        self.labels = list(dict.fromkeys(labels))  # order kept, duplicates dropped
        self.latents = runtime.label_latents(self.labels) if self.labels else None
        self._logit_scale = float(runtime.loaded.model.logit_scale.detach().exp())

    @torch.inference_mode()
    def classify(self, features: ImageFeatures) -> list[tuple[str, float]]:
        """Softmax over the labels of the scaled cosine similarity, best first."""
        if self.latents is None:
            return []
        image = F.normalize(features.pooled.float(), dim=-1)
        scores = (self._logit_scale * self.latents @ image).softmax(-1).tolist()
        return sorted(zip(self.labels, scores), key=lambda x: -x[1])


class ModelRules:
    """Which loaded model decodes: the large one for the configured intents and for long prompts,
    the small one otherwise. With one model loaded, every rule resolves to it."""

    def __init__(self, settings: Settings, loaded: list[str]) -> None:
        if not loaded:
            raise ValueError("the router needs at least one loaded model")
        self.loaded = list(loaded)
        self.small = self._pick(settings.router_small_model, "router_small_model")
        self.large = self._pick(settings.router_large_model, "router_large_model")
        self.large_intents = frozenset(_csv(settings.router_large_intents))
        self.long_prompt_words = settings.router_large_prompt_words

    def _pick(self, name: str, setting: str) -> str:
        if len(self.loaded) == 1 or not name:
            return self.loaded[0]
        if name not in self.loaded:
            raise ValueError(f"setting {setting}={name!r} names no loaded model; loaded: {', '.join(self.loaded)}")
        return name

    def choose(self, intent: str, prompt: str) -> tuple[str, str]:
        if self.small == self.large:
            return self.small, f"{self.small} serves every rule"
        if intent in self.large_intents:
            return self.large, f"intent {intent} goes to the large model"
        if len(prompt.split()) >= self.long_prompt_words:
            return self.large, f"prompt of {self.long_prompt_words}+ words goes to the large model"
        return self.small, "the small model by default"


class StagedRouter:
    def __init__(self, settings: Settings, zero_shot: ZeroShotClassifier, intents: IntentClassifier | None,
                 model_labels: list[str], rules: ModelRules, stage1_file: Path = STAGE1_FILE) -> None:
        self.settings = settings
        self.enabled = settings.router_enabled
        if self.enabled and intents is None:
            raise ValueError("an enabled router needs an intent classifier")
        if intents is not None and self.enabled:
            unknown = (rules.large_intents | {STAGE1_INTENT}) - set(intents.names)
            if unknown:
                raise ValueError(f"setting router_large_intents names unknown intents {sorted(unknown)}; "
                                 f"known: {', '.join(intents.names)}")
        self.zero_shot = zero_shot
        self.intents = intents
        self.rules = rules
        self.policy_labels = frozenset(_csv(settings.router_policy_labels))
        self.answer_labels = frozenset(model_labels) - self.policy_labels
        # Words that tell the labels apart ("red", "circle"), not the ones they all share ("a").
        label_words = [set(_words(label)) for label in self.answer_labels]
        self.label_vocabulary = set().union(*label_words) - set.intersection(*label_words) if label_words else set()
        self.label_blind_words = frozenset(json.loads(stage1_file.read_text())["label_blind_words"])

    @classmethod
    def build(cls, settings: Settings, runtime: ModelRuntime, loaded_models: list[str] | None = None,
              intents: IntentClassifier | None = None) -> "StagedRouter":
        """The server's router over `runtime`'s contrastive towers; loads MiniLM unless given or off."""
        model_labels = list(runtime.loaded.spec.labels)
        if settings.router_policy_labels.strip() and not model_labels:
            # A softmax over the policy labels alone puts them at 1.0 on every image.
            raise ValueError(f"setting router_policy_labels needs a model with zero-shot labels to weigh them "
                             f"against; {runtime.name} has no labels.json")
        zero_shot = ZeroShotClassifier(runtime, model_labels + _csv(settings.router_policy_labels))
        if intents is None and settings.router_enabled:
            intents = IntentClassifier.load(cache_size=settings.router_intent_cache_size)
        rules = ModelRules(settings, loaded_models or [runtime.name])
        return cls(settings, zero_shot, intents, model_labels, rules)

    def decide(self, features: ImageFeatures, prompt_text: str) -> RouteDecision:
        ranked = self.zero_shot.classify(features)
        label, confidence = ranked[0] if ranked else (None, 0.0)
        top = tuple((name, round(p, 4)) for name, p in ranked[:3])
        fired = [(name, p) for name, p in ranked
                 if name in self.policy_labels and p >= self.settings.router_policy_threshold]
        intent = self.intents.classify_one(prompt_text) if self.enabled else None
        observed = dict(intent=intent.name if intent else "", intent_similarity=intent.similarity if intent else 0.0,
                        intent_margin=intent.margin if intent else 0.0, label=label, label_confidence=confidence,
                        labels_top=top)
        if fired:
            name, p = fired[0]
            return RouteDecision("policy", answer=self.settings.router_policy_message,
                                 reason=f"policy label {name!r} at {p:.3f}", **observed)
        if intent is None:
            model = self.rules.small
            return RouteDecision(f"decoder:{model}", model=model, reason="router off", **observed)
        answer, why_not = self._stage1_answer(intent, label, confidence, prompt_text)
        if answer is not None:
            return RouteDecision("stage1", answer=answer, reason=f"label {label!r} at {confidence:.3f}", **observed)
        model, why = self.rules.choose(intent.name, prompt_text)
        return RouteDecision(f"decoder:{model}", model=model, reason=f"{why_not}; {why}", **observed)

    def _stage1_answer(self, intent: Intent, label: str | None, confidence: float,
                       prompt: str) -> tuple[str | None, str]:
        """(the answer, "") when the top label determines it, else (None, why not)."""
        if intent.name != STAGE1_INTENT:
            return None, f"intent {intent.name}"
        if intent.margin < self.settings.router_min_intent_margin:
            return None, f"identification by a margin of {intent.margin:.3f} only"
        if label is None or label not in self.answer_labels:
            return None, "no zero-shot label to answer from"
        if confidence < self.settings.router_zero_shot_threshold:
            return None, f"label confidence {confidence:.3f} below {self.settings.router_zero_shot_threshold}"
        words = set(_words(prompt))
        blind = sorted(words & self.label_blind_words)
        if blind:
            return None, f"the label says nothing about {', '.join(blind)}"
        label_words = _words(label)
        head = label_words[-1]
        others = sorted((words & self.label_vocabulary) - set(label_words))
        if others:
            return None, f"the prompt asks about {', '.join(others)}, not {label!r}"
        if head in words:
            return None, f"the prompt already names the {head}"
        return head, ""


def route_turns(router: StagedRouter, features: ImageFeatures, turns: list[Turn]) -> RouteDecision:
    """What the chat path calls: a finished reply (`decision.answer`) or the decoder model to run
    (`decision.model`). Each answer depends on the image and the last question only, so that
    question alone is routed."""
    return router.decide(features, turns[-1].question)
