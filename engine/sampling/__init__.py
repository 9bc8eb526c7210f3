"""Images from a model: samplers, A1111 prompt syntax, rendering and the previews taken during training."""
