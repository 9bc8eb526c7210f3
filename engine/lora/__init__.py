"""LoRA: the network swapped into the model, its files, the formats other tools write, merge and resize."""
