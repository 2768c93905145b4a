"""Constants shared by data, model and evaluation code."""

IGNORE_INDEX = -100  # label value skipped by cross-entropy (prompt, image and padding positions)
IMAGE_TOKEN = "<image>"  # placeholder in text; the model splices projected image tokens in its place

# Modality ids passed to every router so balance and metrics can be split per modality.
MODALITY_TEXT = 0
MODALITY_IMAGE = 1
MODALITY_NAMES = {MODALITY_TEXT: "text", MODALITY_IMAGE: "image"}
