"""Training VEAD + IM with the backbone frozen: the trainer, per-record products, losses, checkpoints."""
