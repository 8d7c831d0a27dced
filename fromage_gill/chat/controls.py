"""The generation settings as the app's controls show them: one help line per control."""

from __future__ import annotations

# One line per setting, shown under its control in the app.
SETTINGS_HELP: dict[str, str] = {
    "mode": "auto: the model decides when to show an image and whether to retrieve or generate it; "
            "retrieve / generate: always that source; text: never an image.",
    "max_new_tokens": "Upper bound on the length of each answer (in tokens).",
    "temperature": "0 = always the most likely token (deterministic); higher = more varied.",
    "top_p": "Sample only from the most likely tokens whose probabilities add up to this (1 = all).",
    "image_frequency": "Scales the logits of the image tokens: above 1 shows images more often, below 1 less.",
    "image_logit_bias": "Added to the image token's score: positive shows images sooner, negative later or never.",
    "max_images": "At most this many images in one answer.",
    "retrieval_candidates": "How many nearest images the index returns; the best one not yet shown is used.",
    "guidance_scale": "Classifier-free guidance of Stable Diffusion: higher follows the model's prompt more closely.",
    "num_inference_steps": "Diffusion denoising steps: fewer is faster and rougher.",
    "seed": "Fixes sampling and image generation so a turn can be reproduced; 'random' picks a new seed each turn.",
    "index": "The image collection that retrieved images come from.",
    "decoding": "default: plain sampling; magic / contrastive: MAGIC decoding, steering text towards the images.",
}
