"""How the trained UNet sits in memory: its network set up as a run trains it, fp8 bases, block swap, and the planner that predicts a step's peak and picks the mode that fits."""
