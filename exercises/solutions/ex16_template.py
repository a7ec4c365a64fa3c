IMAGE = "<image>"


def chat_segments(turns, system="You are a helpful assistant.", add_generation_prompt=None):
    segments = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for role, text, *rest in turns:
        if rest:
            images, markers = rest[0], text.count(IMAGE)
            if images and not markers:
                text = IMAGE * len(images) + "\n" + text
            elif markers != len(images):
                raise ValueError(f"{markers} markers for {len(images)} images")
        segments += [(f"<|im_start|>{role}\n", False), (text + "<|im_end|>", role == "assistant"), ("\n", False)]
    if add_generation_prompt or (add_generation_prompt is None and turns[-1][0] == "user"):
        segments.append(("<|im_start|>assistant\n", False))
    return segments
