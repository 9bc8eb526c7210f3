"""Images from a model: samplers, A1111 prompt syntax and kohya's prompt options, rendering, grids and the text-encoder LoRA patch."""
