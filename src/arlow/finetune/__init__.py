"""Stages 2 and 3: multimodal alignment and instruction tuning."""
