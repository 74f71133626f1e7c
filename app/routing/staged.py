"""The staged router: light understanding first, the heavy decoder only when it is needed.

Stage 1 is light: zero-shot labels of the image from the checkpoint's contrastive towers (the image
features the decoder needs anyway, against text latents computed once), and the intent of the
prompt from all-MiniLM-L6-v2 (app/routing/intent.py). Then one of three routes:

- "policy": a configured policy label fires on the image -> a fixed refusal, whatever was asked;
- "stage1": an identification question whose answer the top zero-shot label fully determines, at
  or above the confidence threshold -> the label's object name, phrased as the decoder answers
  ("what shape is the red object?" -> "circle");
- "decoder:<model>": everything else, to the model the configured rules pick among the served models
  that can take the request (a caption-only model gets only captions, a text-only conversation only
  a model that takes one).

A label determines the answer only when the prompt refers to the object by nothing the label does
not capture: every label word it names (a colour, a shape) must be the top label's, it must not
name the object it asks to identify, and it must not use a word about size, position or several
objects (app/routing/data/stage1.json). With two objects, the zero-shot label is the larger one's,
which is what a prompt without such words can mean. Stage 1 answers from one served model's towers
(`router_zero_shot_model`): its answer is that model's, so stage 1 runs for requests routed by the
alias (`router_alias`) and for requests that name that model; a request naming another model only
meets the policy check.

Independent of HTTP: the chat service calls `decide`, sends the answer or runs the decoder, and sets
the response headers and metrics from the decision's `route` and `model`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from app.models.contrastive import ZeroShot
from app.models.families.base import FamilyModel
from app.routing.intent import Intent, IntentClassifier
from app.settings import Settings
from vision.encoders.base import ImageFeatures

STAGE1_FILE = Path(__file__).resolve().parent / "data" / "stage1.json"
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
    model: str | None = None  # the model that answers: decodes for "decoder:*", whose towers answered for "stage1"
    reason: str = ""  # why this route, in words, for logs
    labels_top: tuple[tuple[str, float], ...] = ()  # the best few labels

    @property
    def finished(self) -> bool:
        """True when `answer` is the reply; False when the decoder `model` must generate it."""
        return self.answer is not None

    def record(self) -> dict:
        return asdict(self)


class ModelRules:
    """Which served model decodes: the large one for the configured intents and for long prompts, the
    small one otherwise, among the candidates that can take the request. With one model served, every
    rule resolves to it."""

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

    def choose(self, intent: str, prompt: str, candidates: list[str] | None = None) -> tuple[str, str]:
        """(model, why). `candidates`: the served models that can take the request (None: all)."""
        candidates = self.loaded if candidates is None else candidates
        if not candidates:
            raise ValueError("no served model can take this request")
        if self.small == self.large:
            chosen, why = self.small, f"{self.small} serves every rule"
        elif intent in self.large_intents:
            chosen, why = self.large, f"intent {intent} goes to the large model"
        elif len(prompt.split()) >= self.long_prompt_words:
            chosen, why = self.large, f"prompt of {self.long_prompt_words}+ words goes to the large model"
        else:
            chosen, why = self.small, "the small model by default"
        if chosen in candidates:
            return chosen, why
        other = self.large if chosen == self.small else self.small
        fallback = other if other in candidates else candidates[0]
        return fallback, f"{why}, but {chosen} cannot take this request: {fallback} can"


class StagedRouter:
    def __init__(self, settings: Settings, zero_shot: ZeroShot | None, zero_shot_model: str | None,
                 intents: IntentClassifier | None, model_labels: list[str], rules: ModelRules,
                 stage1_file: Path = STAGE1_FILE) -> None:
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
        self.zero_shot_model = zero_shot_model  # whose towers score labels; stage 1 answers as this model
        self.intents = intents
        self.rules = rules
        self.policy_labels = frozenset(_csv(settings.router_policy_labels))
        self.answer_labels = frozenset(model_labels) - self.policy_labels
        # Words that tell the labels apart ("red", "circle"), not the ones they all share ("a").
        label_words = [set(_words(label)) for label in self.answer_labels]
        self.label_vocabulary = set().union(*label_words) - set.intersection(*label_words) if label_words else set()
        self.label_blind_words = frozenset(json.loads(stage1_file.read_text())["label_blind_words"])

    @classmethod
    def build(cls, settings: Settings, zero_shot_model: FamilyModel | None, loaded_models: list[str],
              intents: IntentClassifier | None = None, zero_shot_name: str | None = None) -> "StagedRouter":
        """The server's router: zero-shot labels from `zero_shot_model`'s contrastive towers (None: no
        stage 1 and no policy labels), MiniLM for intents unless given or off. `zero_shot_name`: what
        that model is served as (default its own name)."""
        model_labels = list(zero_shot_model.labels) if zero_shot_model is not None else []
        if settings.router_policy_labels.strip() and not model_labels:
            # A softmax over the policy labels alone puts them at 1.0 on every image.
            raise ValueError("setting router_policy_labels needs a served model with zero-shot labels to weigh them "
                             "against (router_zero_shot_model)")
        zero_shot = (ZeroShot(zero_shot_model.contrastive, model_labels + _csv(settings.router_policy_labels))
                     if model_labels else None)
        if intents is None and settings.router_enabled:
            intents = IntentClassifier.load(cache_size=settings.router_intent_cache_size)
        name = zero_shot_name or (zero_shot_model.name if zero_shot_model is not None else None)
        return cls(settings, zero_shot, name, intents, model_labels, ModelRules(settings, loaded_models))

    def decide(self, images: list[ImageFeatures], prompt_text: str, candidates: list[str] | None = None,
               stage1: bool = True) -> RouteDecision:
        """`images`: the conversation's images as the zero-shot model sees them (every one is checked
        against the policy labels; stage 1 answers about a lone image only). `candidates`: the served
        models that can take the request (None: all). `stage1` False: the request named a model other
        than the zero-shot one, whose answer stage 1 cannot give."""
        ranked_all = [self.zero_shot.classify(f) for f in images] if self.zero_shot is not None else []
        for ranked in ranked_all:
            fired = [(name, p) for name, p in ranked
                     if name in self.policy_labels and p >= self.settings.router_policy_threshold]
            if fired:
                name, p = fired[0]
                return RouteDecision("policy", intent="", intent_similarity=0.0, intent_margin=0.0, label=name,
                                     label_confidence=p, answer=self.settings.router_policy_message,
                                     reason=f"policy label {name!r} at {p:.3f}", labels_top=_top(ranked))
        ranked = ranked_all[0] if len(ranked_all) == 1 else []
        label, confidence = ranked[0] if ranked else (None, 0.0)
        intent = self.intents.classify_one(prompt_text) if self.enabled else None
        observed = dict(intent=intent.name if intent else "", intent_similarity=intent.similarity if intent else 0.0,
                        intent_margin=intent.margin if intent else 0.0, label=label, label_confidence=confidence,
                        labels_top=_top(ranked))
        if intent is None:
            model, why = self.rules.choose("", prompt_text, candidates)
            return RouteDecision(f"decoder:{model}", model=model, reason=f"router off; {why}", **observed)
        answer, why_not = (self._stage1_answer(intent, label, confidence, prompt_text) if stage1
                           else (None, "the request names a model stage 1 does not answer for"))
        if answer is not None:
            return RouteDecision("stage1", answer=answer, model=self.zero_shot_model,
                                 reason=f"label {label!r} at {confidence:.3f}", **observed)
        model, why = self.rules.choose(intent.name, prompt_text, candidates)
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


def _top(ranked: list[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    return tuple((name, round(p, 4)) for name, p in ranked[:3])
