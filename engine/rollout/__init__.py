"""Roll-outs: shadow, canary and A/B, with paired output comparison and gates that promote or
roll back on their own (README: Roll-outs). spec.py: what a roll-out is asked to do;
controller.py: one roll-out (routing, mirrors, pairs, its state); compare.py: how a pair's
outputs are judged; stats.py: what is measured; gates.py: what happens next; budget.py: how much
a mirror may cost; manager.py: every roll-out of the engine and their persistence; report.py:
`convoy rollout report`; metrics.py: their Prometheus families."""

from .controller import ARM_PARAMETER, Rollout, RolloutRoute
from .manager import RolloutManager

__all__ = ["ARM_PARAMETER", "Rollout", "RolloutManager", "RolloutRoute"]
