"""DP, data-parallel backpropagation: the time table's other way to use K
workers. Every worker holds the whole model; the batch of B is cut into K
shards of B/K, each worker back-propagates its shard's mean loss and the
gradients are averaged, so the step is BP's on the whole batch except that
BN normalises each shard with its own statistics.

DP is BP placed as one stage with K replicas (fdgbench/placement.py, which
says how each engine runs replicas and averages their gradients); with
``--replicas R`` it is K x R replicas.
"""

from fdgbench.method import register
from fdgbench.placement import Placement

from .bp import BP


@register
class DP(BP):
    name = "dp"
    order = 80
    summary = "data-parallel BP: K replicas of the whole model, batch split K ways, gradients averaged"

    def placement(self, splits, replicas):
        return Placement(1, splits * replicas)
