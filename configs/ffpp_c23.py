"""The paper's setting: FaceForensics++ c23, all four manipulation methods, 299x299 faces.

Data: `cae-jax prepare ffpp --root FF++ --out data/ffpp_c23` (real + Deepfakes, Face2Face,
FaceSwap, NeuralTextures at c23, official splits). Encoder: ImageNet Xception from
`cae-jax import-weights ... --output weights/xception` (pass
`--config.init_from=weights/xception`; random init when empty). Model selection: frame AUC
on the validation split; `cae-jax evaluate --split test` reports test numbers once at the end.
"""

from cae_jax.config import default_config


def get_config():
    config = default_config()
    config.input.train_dirs = ("data/ffpp_c23",)
    config.input.class_balance = True  # FF++ has 4 fakes per real video.
    config.input.workers = 8
    config.train.steps = 40_000
    config.train.batch_size = 32
    config.train.eval_every = 2_000
    config.train.checkpoint_every = 2_000
    config.train.keep_checkpoints = 3
    config.loss.recon_weight = 1.0
    return config
