"""The Lightning side of fine-tuning: the LightningModule, the Trainer and its optimizers."""
