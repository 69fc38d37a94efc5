"""slora_jax.runner.evaluators against independent NumPy computations.

Random logits, uneven tasks (3, 1, 4, 2 classes), three tasks seen
(``hi`` = 8) and padding rows: every count is an integer, so the sums must
equal NumPy's exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax import head as head_lib
from slora_jax.runner import evaluators
from slora_jax.runner import metrics

SIZES = [3, 1, 4, 2]
C, HI, SEEN = 10, 8, 3
BOUNDS = np.cumsum([0, *SIZES])
TASK_OF = metrics.class_to_task(SIZES)


def _batch(seed, hi=HI, n=40, pad=7):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, hi, n)
  label[-pad:] = 0                       # padding rows, as the loader pads
  mask = np.ones(n, np.float32)
  mask[-pad:] = 0
  # Logits near each image's label, so hits, own-task and cross-task errors
  # all occur.
  logits = rng.normal(size=(n, C)).astype(np.float32)
  logits[np.arange(n), label] += 1.0
  return {"image": logits, "label": label, "mask": mask}


def _sums(batches, hi=HI):
  step = evaluators.make_eval_step(lambda a, x: x, C, SIZES)
  sums = None
  for b in batches:
    sums = evaluators.add(sums, step({}, b, hi))
  return jax.tree.map(np.asarray, sums)


def _numpy(batches, hi=HI):
  """Counts per task, by loops over the real rows."""
  out = {k: np.zeros(len(SIZES)) for k in
         ("count", "top1", "top5", "til", "earlier", "later")}
  pairs = np.zeros((C, C))
  for b in batches:
    for x, y, m in zip(b["image"], b["label"], b["mask"]):
      if not m:
        continue
      k = TASK_OF[y]
      seen = x[:hi]
      pred = int(np.argmax(seen))
      own = BOUNDS[k] + int(np.argmax(x[BOUNDS[k]:BOUNDS[k + 1]]))
      out["count"][k] += 1
      out["top1"][k] += pred == y
      out["top5"][k] += y in np.argsort(-seen)[:5]
      out["til"][k] += own == y
      out["earlier"][k] += TASK_OF[pred] < k
      out["later"][k] += TASK_OF[pred] > k
      if TASK_OF[pred] != k:
        pairs[y, pred] += 1
  return out, pairs


def _old_class_il_step(num_classes, num_tasks):
  """steps.make_eval_step before the evaluators (its class-IL sums)."""

  def eval_step(logits, batch, hi, task_of_class):
    logits = head_lib.masked_logits(logits,
                                    head_lib.class_mask(0, hi, num_classes))
    top = jax.lax.top_k(logits, min(5, num_classes))[1]
    label = batch["label"]
    top1 = top[:, 0] == label
    top5 = jnp.any(top == label[:, None], axis=-1)
    onehot = (jax.nn.one_hot(task_of_class[label], num_tasks)
              * batch["mask"][:, None])
    return {"top1": top1.astype(jnp.float32) @ onehot,
            "top5": top5.astype(jnp.float32) @ onehot,
            "count": jnp.sum(onehot, axis=0)}

  return jax.jit(eval_step)


BATCHES = [_batch(0), _batch(1)]


def test_task_il_and_class_il_equal_numpy():
  sums, (want, _) = _sums(BATCHES), _numpy(BATCHES)
  np.testing.assert_array_equal(sums["task_il"]["top1"], want["til"])
  np.testing.assert_array_equal(sums["task_il"]["count"], want["count"])
  for key in ("top1", "top5", "count"):
    np.testing.assert_array_equal(sums["class_il"][key], want[key])
  assert want["count"][SEEN:].sum() == 0          # unseen tasks: no images
  # The tasks disagree somewhere, or the test would not tell them apart.
  assert np.all(want["til"][:SEEN] > want["top1"][:SEEN])


def test_class_il_is_bit_identical_to_the_old_step():
  old = _old_class_il_step(C, len(SIZES))
  new = _sums(BATCHES)["class_il"]
  got = None
  for b in BATCHES:
    got = evaluators.add(got, old(b["image"], b, HI, jnp.asarray(TASK_OF)))
  for key in ("top1", "top5", "count"):
    np.testing.assert_array_equal(new[key], np.asarray(got[key]))


def test_cross_task_counts_equal_numpy():
  sums, (want, pairs) = _sums(BATCHES), _numpy(BATCHES)
  np.testing.assert_array_equal(sums["cross_task"]["to_earlier"],
                                want["earlier"])
  np.testing.assert_array_equal(sums["cross_task"]["to_later"], want["later"])
  np.testing.assert_array_equal(sums["cross_task"]["pairs"], pairs)
  assert want["earlier"].sum() > 0 and want["later"].sum() > 0


def test_task_record_names_every_metric():
  sums, (want, pairs) = _sums(BATCHES), _numpy(BATCHES)
  r = evaluators.task_record(sums, SEEN)
  n, c1, til = want["count"][:SEEN], want["top1"][:SEEN], want["til"][:SEEN]
  assert r["top1_per_task"] == [metrics.percent(a, b) for a, b in zip(c1, n)]
  assert r["top1_sample_weighted"] == metrics.percent(c1.sum(), n.sum())
  assert r["task_il_top1_per_task"] == [metrics.percent(a, b)
                                        for a, b in zip(til, n)]
  assert r["task_il_top1_sample_weighted"] == metrics.percent(til.sum(),
                                                              n.sum())
  assert r["task_il_top1_task_mean"] == pytest.approx(
      np.mean(r["task_il_top1_per_task"]), abs=0)
  assert r["counts"]["to_later"] == want["later"][:SEEN].tolist()
  assert r["counts"]["task_il_top1"] == til.tolist()
  # The cross-task error pairs only once every task is evaluated.
  assert "cross_task_errors" not in r
  every = [_batch(2, hi=C), _batch(3, hi=C)]
  sums, (_, pairs) = _sums(every, hi=C), _numpy(every, hi=C)
  full = evaluators.task_record(sums, len(SIZES))
  assert pairs.sum() > 0 and full["cross_task_errors"] == [
      [l, p, int(pairs[l, p])] for l, p in zip(*np.nonzero(pairs))]
  s = evaluators.scalars(r)
  assert s["eval/task_il_top1"] == r["task_il_top1_sample_weighted"]
  assert s["eval/top1"] == r["top1_sample_weighted"]
  assert set(s) >= {"eval/top1_task_mean", "eval/top5", "eval/top1_task3",
                    "eval/task_il_top1_task_mean", "eval/to_earlier_task"}
