"""`cae-jax bench`: cae-jax's speed beside peers measured in the same run on the same machine.

`cli` is the command; the CPU rows come from `layers`, `model_rows`, `input_rows` and
`prepare_rows`, timed with `timing` and tabled by `report`; `accelerator` holds the GPU rows.
The peers live here too: `torch_peer` (PyTorch) and `tf_data_reference` (tf.data). Nothing is
imported here: the GPU image has no TensorFlow and no grain, and `accelerator` needs neither.
"""
