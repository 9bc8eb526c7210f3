"""The training loop and the parts only it uses: the objective, the prediction it trains, data parallelism, previews."""
