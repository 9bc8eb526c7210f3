"""Measuring tools that `gesso bench`, `gesso memory` and `benchmarks/` share: step timing and memory prediction."""
