"""Exercise 16 (easy): the chat template (ChatML, the release's qwen_1_5), split where the loss begins and ends
(docs/MODEL.md §3).

Read first: interleave.chat_prompt and interleave.build_inputs (the callers: one joins your segments into the prompt
text, the other tokenizes them and labels the replies), docs/MODEL.md §3 (the template) and §5 (what the loss sees).
Check: python -m pytest exercises -k template
"""
IMAGE = "<image>"


def chat_segments(turns, system="You are a helpful assistant.", add_generation_prompt=None):
    """A conversation as a list of (text, is_reply) pairs; joined, the texts are the ChatML prompt.

    turns: (role, text) or (role, text, images) tuples, role "user" or "assistant", images a list (of anything).
    1. First ("<|im_start|>system\\n" + system + "<|im_end|>\\n", False).
    2. Then for each turn three segments: ("<|im_start|>" + role + "\\n", False), (text + "<|im_end|>", is_reply)
       and ("\\n", False), where is_reply is True for an assistant turn only: the reply and its <|im_end|> are what
       the training loss sees.
       Images: a turn whose images list is not empty and whose text has no "<image>" marker gets one marker per image
       in front of its text, then a newline: "<image><image>\\n" + text. A turn that has an images list (even an
       empty one) and some markers needs exactly one marker per image: otherwise raise ValueError. A (role, text)
       turn is left as it is.
    3. Last, the generation prompt ("<|im_start|>assistant\\n", False) if add_generation_prompt is True, or if it is
       None and the last turn is the user's.
    """
    raise NotImplementedError("exercise 16: chat_segments")
