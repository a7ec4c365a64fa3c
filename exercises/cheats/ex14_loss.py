"""Cheat: train.py's WithLoss on a stand-in model whose decoder returns the given hidden states."""
from types import SimpleNamespace

import torch

import train


def reply_loss(hidden, labels, lm_head):
    def embed(ids, pixels, sizes):
        """The given hidden states, as the decoder's input."""
        return hidden[None]

    def decoder(x, positions, cache, start, cu_seqlens):
        """Passes them through."""
        return x

    model = SimpleNamespace(embed=embed, decoder=decoder, lm_head=lm_head)
    positions = torch.arange(len(labels))[None]
    return train.WithLoss(model, hidden.dtype)(labels[None], labels, None, None, positions)
