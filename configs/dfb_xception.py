"""DeepfakeBench's Xception recipe (their training/config/detector/xception.yaml) as a pure
classifier: the cae-jax encoder and a linear head, no decoder loss.

Data: `cae-jax prepare deepfakebench --root DFB/datasets/rgb --json DFB/preprocessing/
dataset_json --name FaceForensics++ --out data/dfb/FaceForensics++` (their FF++ c23 JSON: real
and the four methods, their splits, 32 frames per video, 256x256 as they are). Encoder: ImageNet
Xception as they start from (Cadene's weights = timm's `legacy_xception`):
`cae-jax import-weights --format timm ... --output weights/xception_timm`.

Their recipe: resolution 256, batch 32, 10 epochs, 32 frames per video, Adam (lr 2e-4, betas
0.9/0.999, eps 1e-8, weight decay 5e-4) at a constant rate, no clipping, cross-entropy over
2 classes (here: one logit and BCE, the same model), flip 0.5, Gaussian blur 0.5 (3-7),
brightness/contrast 0.5 (+-0.1), JPEG 40-100 at 0.5, isotropic resize, no class balancing.
Differences left: weight decay is AdamW's decoupled decay (theirs is Adam's L2 term), their
brightness/contrast step sometimes draws FancyPCA or hue/saturation instead, and model
selection uses the validation split (they pick the best epoch on the test sets).
"""

from cae_jax.config import default_config

FFPP_TRAIN_FRAMES = 3600 * 32  # 720 train videos x (real + 4 methods) x 32 frames.
EPOCHS = 10


def get_config():
    config = default_config()
    config.seed = 1024  # Their manualSeed.
    config.init_from = "weights/xception_timm"
    config.model.image_size = 256
    config.model.pool_padding = "torch"  # Cadene / timm weights.
    config.model.bn_epsilon = 1e-5
    config.model.bn_momentum = 0.9  # PyTorch's BatchNorm2d momentum 0.1.
    config.model.classifier.hidden = ()  # Their last_linear on the pooled features.
    config.loss.recon_weight = 0.0

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 0
    config.optim.end_learning_rate_factor = 1.0  # lr_scheduler: null (constant).
    config.optim.weight_decay = 5e-4
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.999, 1e-8
    config.optim.clip_grad_norm = 0.0

    config.train.batch_size = 32
    steps_per_epoch = FFPP_TRAIN_FRAMES // config.train.batch_size
    config.train.steps = EPOCHS * steps_per_epoch
    config.train.eval_every = steps_per_epoch  # They test once per epoch.
    config.train.checkpoint_every = steps_per_epoch
    config.train.keep_checkpoints = 2

    config.input.train_dirs = ("data/dfb/FaceForensics++",)
    config.input.eval_split = "validation"
    config.input.class_balance = False
    config.input.workers = 8
    config.input.augment.resize_prob = 1.0
    config.input.augment.flip_prob = 0.5
    config.input.augment.blur_prob, config.input.augment.blur_kernel = 0.5, (3, 7)
    config.input.augment.brightness_contrast_prob = 0.5
    config.input.augment.brightness_limit = config.input.augment.contrast_limit = 0.1
    config.input.augment.jpeg_prob, config.input.augment.jpeg_quality = 0.5, (40, 100)
    return config
