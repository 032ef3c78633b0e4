"""Raw deepfake datasets (videos, images) -> face crops in sharded TFRecords: `cae-jax prepare`."""
