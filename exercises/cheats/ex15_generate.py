"""Cheat: the model's own generate."""


def greedy(model, input_ids, pixel_values, max_new_tokens, stop_ids):
    return model.generate(input_ids, pixel_values, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                          cuda_graph=False)
