"""Input-pipeline scaling over worker processes, and the host cores it implies.

  python -m experiments.benchmark_pipeline                 # the measurement
  python -m experiments.benchmark_pipeline --images=32 --batch=8 --batches=2
                                                           # smoke run

Separate from ``python -m experiments.benchmark``, which times the model in
one process: this one needs the machine's cores to itself (the speed-up from
1 to 2 worker processes is only meaningful when nothing else runs) and has
its own settings. See `experiments.benchmark.workers`.
"""

from __future__ import annotations

from absl import app
from absl import flags

from experiments import tool
from experiments.benchmark import workers

_D = workers.PipelineSettings()
_IMAGES = flags.DEFINE_integer("images", _D.images, "JPEGs written (~500x375).")
_SIZE = flags.DEFINE_integer("image_size", _D.image_size, "Crop side (px).")
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", _D.batches,
                                "Timed batches per configuration.")
_THREADS = flags.DEFINE_integer("threads", _D.threads,
                                "Decoding threads of the thread reference.")
_PREFETCH = flags.DEFINE_integer("prefetch", _D.prefetch,
                                 "Batches each worker assembles ahead.")
_PROCESSES = flags.DEFINE_list("processes", [str(k) for k in _D.processes],
                               "Worker-process counts to time.")


def main(argv):
  tool.positional(argv)
  s = workers.PipelineSettings(
      images=_IMAGES.value, image_size=_SIZE.value, batch=_BATCH.value,
      batches=_BATCHES.value, threads=_THREADS.value, prefetch=_PREFETCH.value,
      processes=tuple(int(k) for k in _PROCESSES.value))
  if s.batches < 4 or s.images < 1 or s.batch < 1:
    raise app.UsageError("need --batches >= 4, --images >= 1 and --batch >= 1")
  table = workers.run(s)
  print(workers.header(s) + "\n" + table.format(), flush=True)


if __name__ == "__main__":
  tool.run(main)
