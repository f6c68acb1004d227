"""Named remat policies: each keeps exactly the activations it names for the backward pass."""

import re

import jax
import pytest

from clipjax.models.layers import Transformer


def saved_names(remat: str, capsys) -> list[str]:
    """The named activations the backward pass of a 2-block tower keeps under ``remat`` (jax's residual report)."""
    model = Transformer(depth=2, num_heads=2, head_dim=4, mlp_dim=16, remat=remat, scan=False)
    x_BTD = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = model.init(jax.random.key(1), x_BTD)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda p: model.apply(p, x_BTD).sum(), params)
    return re.findall(r"named '(\w+)'", capsys.readouterr().out)


@pytest.mark.parametrize("remat,saved", [
    ("full", []),
    ("qkv", ["query_proj", "key_proj", "value_proj"]),
    # mlp_out is named too, but nothing in the backward pass reads a block's output: x + mlp is linear.
    ("matmuls", ["query_proj", "key_proj", "value_proj", "attn_context", "attn_out", "mlp_fc"]),
])
def test_a_named_policy_keeps_what_it_names_in_every_block(remat, saved, capsys):
    assert saved_names(remat, capsys) == saved * 2


def test_policies_by_primitive_keep_no_names(capsys):
    """Control: "dots" keeps the same matmul outputs by primitive, so the report names none of them."""
    assert saved_names("dots", capsys) == []
