"""Demonstrations that run several stages end to end (on top of ``pretrain``, ``finetune`` and ``evaluation``)."""
