"""The PyTorch UniAlignment class under the name the tests used before it moved into the
package (`unialign_convert.torch_unialignment`); new tests import it from there."""

from unialign_convert.torch_unialignment import SD3JointModelFlexible as UniAlignmentStandIn

__all__ = ["UniAlignmentStandIn"]
