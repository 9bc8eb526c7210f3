"""The training config: typed sections and their rules, the TOML readers (ours and kohya's dataset files)."""
