"""A run's folder and what it leaves there: the lock, the LoRA files and resumable state, their metadata, logs and events."""
