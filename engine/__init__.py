"""The training engine: the loop and its parts at this level, with data, LoRA, sampling and measuring in rooms of their own."""
