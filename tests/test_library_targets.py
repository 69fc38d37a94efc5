"""Target rules that cannot be honoured give one clear error naming the rule
(or target) and the nearest parameter paths, for every rule type."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import slora_jax as sl
from slora_jax.models import vit

PARAMS = {"blocks_0": {"attn": {"qkv": {"kernel": jnp.zeros((4, 12)),
                                        "bias": jnp.zeros((12,))},
                                "proj": {"kernel": jnp.zeros((4, 4))}},
                       "norm": {"scale": jnp.zeros((4,))}},
          "head": {"kernel": jnp.zeros((4, 7))}}


def _error(rules, params=PARAMS):
  with pytest.raises(ValueError) as info:
    sl.init_adapters(params, rules, capacity=1, max_rank=1)
  return str(info.value)


@pytest.mark.parametrize("rule,shown", [
    (sl.kernel(r"blocks_\d+/attn/qvk/kernel"),
     r"kernel\('blocks_\\\\d\+/attn/qvk/kernel'\) matched no parameter"),
    (sl.fused_slices(r"blocks_\d+/atn/qkv/kernel"),
     r"fused_slices\('blocks_\\\\d\+/atn/qkv/kernel', parts=3, .*\) matched "
     r"no parameter"),
])
def test_rule_matching_nothing_names_it_and_the_nearest_paths(rule, shown):
  msg = _error([rule])
  assert msg.count("matched no parameter") == 1
  assert re.search(shown, msg), msg
  # The nearest kernels, the intended one first; 1-D leaves are not offered.
  assert "nearest paths: ['blocks_0/attn/qkv/kernel'" in msg
  assert "norm/scale" not in msg


@pytest.mark.parametrize("rule,why", [
    (sl.kernel(r"blocks_0/attn/qkv/bias"), r"shape \(12,\): no output axis"),
    (sl.kernel(r"head/kernel", in_dims=2), r"shape \(4, 7\): no output axis"),
    (sl.fused_slices(r"head/kernel"), r"7 output features.*3 equal parts"),
    (sl.fused_slices(r"blocks_0/attn/qkv/kernel", take=((3, "x"),)),
     r"take indices \[3\] are outside the 3 parts"),
])
def test_rule_matching_a_leaf_that_is_no_2d_map(rule, why):
  msg = _error([rule])
  assert re.search(why, msg), msg
  assert "nearest kernels: [" in msg


def test_all_problems_in_one_error_and_bad_regex():
  msg = _error([sl.kernel("head/kernel["), sl.kernel("nothing"),
                sl.fused_slices("head/kernel")])
  assert msg.startswith("adapter targets: ")
  assert "not a valid regular expression" in msg
  assert "kernel('nothing') matched no parameter" in msg
  assert "do not split into 3 equal parts" in msg


def test_resolved_targets_that_do_not_exist_or_do_not_fit():
  ad = sl.init_adapters(PARAMS, [sl.kernel(r"blocks_0/attn/proj/kernel")],
                        capacity=1, max_rank=1)
  other = {"blocks_0": {"attn": {"prj": {"kernel": jnp.zeros((4, 4))}}}}
  msg = _error(ad.spec.targets, other)
  assert ("blocks_0/attn/proj/kernel does not exist; nearest paths: "
          "['blocks_0/attn/prj/kernel']") in msg
  with pytest.raises(ValueError, match="does not exist"):
    sl.apply_adapters(other, ad)
  wrong = {"blocks_0": {"attn": {"proj": {"kernel": jnp.zeros((4, 5))}}}}
  assert "has shape (4, 5), the adapters expect (4, 4)" in _error(
      ad.spec.targets, wrong)


def test_nnx_state_paths_are_offered_without_value():
  state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
  msg = _error([sl.kernel("kernal")], state)
  assert "nearest paths: ['kernel']" in msg
  assert jax.tree.leaves(state)


# --- issue #23: whole-path matching, leaves that are no linear map -----------

BERTISH = {"encoder": {"layer": {str(i): {"attention": {"self": {
    "query": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros((4,))},
    "value": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros((4,))}}}}
    for i in range(2)}},
    "embeddings": {"word_embeddings": {"embedding": jnp.zeros((50, 4))}}}


def test_a_rule_matching_part_of_paths_says_rules_match_whole_paths():
  msg = _error([sl.kernel(r"attention/self/(query|value)/kernel")], BERTISH)
  assert ("matched no parameter (rules match whole paths, re.fullmatch; it "
          "matches part of 4 path(s) such as "
          "'encoder/layer/0/attention/self/query/kernel': start it with '.*' "
          "to match those)") in msg
  assert "re.fullmatch" in sl.kernel.__doc__ and "whole" in sl.kernel.__doc__
  ad = sl.init_adapters(
      BERTISH, [sl.kernel(r".*attention/self/(query|value)/kernel")],
      capacity=1, max_rank=1)
  assert len(ad.spec.targets) == 4


def test_conv_kernels_and_embedding_tables_are_refused_unless_opted_in():
  cfg = vit.vit_ti16(image_size=16, patch_size=8, depth=1)
  params = vit.init_params(cfg, jax.random.key(0))
  conv = [p for p, x in _leaves(params) if len(x) == 4]
  assert conv                                  # the patch embedding
  msg = _error([sl.kernel(r".*/kernel")], params)
  assert (f"kernel('.*/kernel') matches 1 leaf that is a convolution kernel, "
          f"no linear map ({conv[0]} ") in msg
  assert "pass any_shape=True" in msg
  ad = sl.init_adapters(params, [sl.kernel(r".*/kernel", any_shape=True)],
                        capacity=1, max_rank=1)
  assert conv[0] in {t.path for t in ad.spec.targets}
  msg = _error([sl.kernel(r".*embedding")], BERTISH)
  assert "matches 1 leaf that is an embedding table, no linear map" in msg


def test_many_unfit_leaves_give_one_short_sentence():
  cfg = vit.vit_ti16(image_size=16, patch_size=8, depth=2)
  params = vit.init_params(cfg, jax.random.key(0))
  msg = _error([sl.kernel(r".*(bias|scale)")], params)
  count = sum(1 for p, x in _leaves(params)
              if re.fullmatch(r".*(bias|scale)", p))
  assert count > 10
  assert msg.count("matches") == 1, msg
  assert f"matches {count} leaves with no output axis (" in msg
  assert f"and {count - 3} more" in msg and len(msg) < 600, len(msg)


def _leaves(tree):
  from slora_jax import targets  # pylint: disable=import-outside-toplevel
  return [(targets.leaf_path(p), x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]
