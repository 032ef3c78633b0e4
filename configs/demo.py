"""`cae-jax demo`: a small CAE (64x64 faces, narrow widths) that learns self-blended fakes on
a 2-core CPU in minutes. Not the paper's model: same architecture family, ~100x fewer
FLOPs, so the whole pipeline (prepare -> train -> evaluate -> export -> predict) runs anywhere.
`cae-jax demo` fills in input.train_dirs with the dataset it builds.
"""

from cae_jax.config import default_config


def get_config():
    config = default_config()
    config.model.image_size = 64
    config.model.encoder.stem_features = (16, 32)
    config.model.encoder.entry_features = (32, 48, 64)
    config.model.encoder.middle_blocks = 1
    config.model.encoder.exit_features = (64, 96)
    config.model.encoder.head_features = (96, 128)
    config.model.decoder.features = (64, 32, 16, 16, 8)
    config.model.classifier.hidden = (64,)
    config.model.classifier.dropout = 0.2
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 30
    config.optim.weight_decay = 1e-4
    config.train.steps = 1600
    config.train.batch_size = 32
    config.train.log_every = 20
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 2
    # Faces are small upscaled photos: keep flips and mild colour changes, no JPEG/blur that
    # would wash out the blending traces the demo's fakes carry.
    config.input.augment.blur_prob = 0.0
    config.input.augment.jpeg_prob = 0.0
    # The demo stores real training videos only: half their faces become fresh self-blended
    # fakes (1:1), every identity is seen as both classes, and no blend is seen twice, so the
    # detector has to find the blend, not the face.
    config.input.sbi.prob = 0.5
    return config
