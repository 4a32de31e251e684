"""Stage 1: masked-autoencoder pretraining of the vision encoder."""
