"""Compressing the frozen LLM: pruning masks (magnitude, Wanda, random), the shared α-SubNet."""
