"""The CAE (reconstruction + classification) on exactly DeepfakeBench's Xception data, schedule
and augmentations (configs/dfb_xception.py): the same comparison, one change of model.

Only the model and loss differ from dfb_xception: the decoder's reconstruction loss is on
(loss.recon_weight=1) and the classifier has the paper's hidden layer (Dense 256, ReLU,
Dropout 0.5). Evaluate both with `cae-jax evaluate --protocol deepfakebench`.
"""

from pathlib import Path

from cae_jax.config import python_file


def get_config():
    config = python_file(Path(__file__).with_name("dfb_xception.py"), "cae_jax_config").get_config()
    config.model.classifier.hidden = (256,)
    config.model.classifier.dropout = 0.5
    config.loss.recon_weight = 1.0
    return config
