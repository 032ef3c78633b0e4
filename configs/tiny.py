"""A tiny CAE (64x64 input, narrow widths) that trains in seconds on CPU: for tests."""

from cae_jax.config import default_config


def get_config():
    config = default_config()
    config.model.image_size = 64
    config.model.encoder.stem_features = (8, 16)
    config.model.encoder.entry_features = (16, 24, 32)
    config.model.encoder.middle_blocks = 1
    config.model.encoder.exit_features = (32, 48)
    config.model.encoder.head_features = (48, 64)
    config.model.decoder.features = (32, 16, 16, 8, 8)
    config.model.classifier.hidden = (16,)
    config.optim.warmup_steps = 2
    config.train.steps = 20
    config.train.batch_size = 8
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    return config
