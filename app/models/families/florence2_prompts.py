"""Florence-2's task prompts, as transformers 5.24's `Florence2Processor` turns them into the text its
BART encoder reads (`_construct_prompts`, then `prepare_inputs_layout`):

    "<CAPTION>"                    -> <image>*N <s> What does the image describe? </s>
    "<OPEN_VOCABULARY_DETECTION>cat" -> <image>*N <s> Locate cat in the image. </s>
    any other text                 -> <image>*N <s> {text} </s>  (as the processor passes it through)

A task token without input must be the whole prompt (the processor raises otherwise; here a 400).
The tables are the processor's own, copied as data (tests/test_florence2_oracle.py holds them equal).
"""

from __future__ import annotations

TASKS_WITHOUT_INPUT = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}
TASKS_WITH_INPUT = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}
DEFAULT_TASK = "<CAPTION>"  # a request with an image and no text: what a caption route asks


class TaskPromptError(ValueError):
    """A prompt the processor refuses (the message says why)."""


def encoder_text(prompt: str) -> str:
    """The text between <s> and </s> for a client's prompt: `Florence2Processor._construct_prompts`."""
    for token, text in TASKS_WITHOUT_INPUT.items():
        if token in prompt:
            if prompt != token:
                raise TaskPromptError(f"task token {token} must be the whole prompt (got {prompt!r})")
            prompt = text
            break
    for token, text in TASKS_WITH_INPUT.items():
        if token in prompt:
            prompt = text.format(input=prompt.replace(token, "").strip())
            break
    return prompt
