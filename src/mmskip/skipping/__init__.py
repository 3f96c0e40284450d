"""Skipping computations inside a frozen decoder: static plans, per-family adapters, the engine."""
