"""Evaluation metrics: KID, LPIPS diversity, FLD / generalization gap, the feature networks they use, and
`geca evaluate`'s protocol (`evaluate.py`)."""
