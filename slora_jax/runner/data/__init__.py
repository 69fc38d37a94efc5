"""Data: sources, the reference's class order and transforms, batch iterators."""

from slora_jax.runner.data.loader import (BatchIterator, epoch_order, eval_batches,
                                   local_rows, measure_throughput,
                                   steps_per_epoch, train_batches)
from slora_jax.runner.data.sources import (DataError, IdxSource, ImageFolderSource,
                                    Source, Split, SyntheticSource, TfdsSource,
                                    make_source, validate)
from slora_jax.runner.data.tasks import class_order, remap_labels, task_ranges, task_sizes
from slora_jax.runner.data.transforms import (EvalTransform, TrainTransform, epoch_rng,
                                       sample_rng)
