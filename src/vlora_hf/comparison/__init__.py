"""`vlora-hf compare`: VLoRA and transformers' LLaVA-1.5 trained on the same data, from the same recipe, for the same
steps; held-out exact match per question family along training, training and inference cost, a report."""
