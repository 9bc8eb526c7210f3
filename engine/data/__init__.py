"""Training data: images, captions, aspect-ratio buckets, the dataset and its latent and text caches."""
