"""The training engine shared by pretraining and fine-tuning (accelerate loop, precision, checkpoints). It knows no model."""
