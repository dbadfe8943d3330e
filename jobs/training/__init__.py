"""Training: sample preparation (schema, augmentation, samples) and the Ray Train stages."""
