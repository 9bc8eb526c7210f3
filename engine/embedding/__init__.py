"""Textual-inversion embeddings: new token vectors in the frozen text encoders, their files, and training them."""
