"""Celeb-DF (v2): train on its official training list, validate and test on its own splits.

Data: `cae-jax prepare celebdf --root Celeb-DF-v2 --out data/celebdf` (the test split is
the official List_of_testing_videos.txt). Celeb-DF has ~6 fakes per real video, so real and
fake are drawn 1:1. For the cross-dataset protocol (train FF++, test Celeb-DF) use
configs/ffpp_c23.py and `cae-jax evaluate --data data/ffpp_c23,data/celebdf --split test`.
"""

from cae_jax.config import default_config


def get_config():
    config = default_config()
    config.input.train_dirs = ("data/celebdf",)
    config.input.class_balance = True
    config.input.workers = 8
    config.train.steps = 30_000
    config.train.batch_size = 32
    config.train.eval_every = 2_000
    config.train.checkpoint_every = 2_000
    return config
