"""Roll-outs: shadow, canary and A/B, with paired output comparison and gates that promote or
roll back on their own (README: Roll-outs). spec.py: what a roll-out is asked to do;
controller.py: one roll-out (routing, mirrors, pairs, its state); routing.py: the route and the
futures it wraps; compare.py: how a pair's outputs are judged; stats.py: what is measured;
gates.py: what happens next; budget.py: how much a mirror may cost; manager.py: every roll-out of
the engine; state.py: the --rollout-state file; report.py: `convoy rollout report`; metrics.py:
their Prometheus families.

Nothing is re-exported: importing report.py (a front end renders the HTML page) loads no
controller, scheduler or runtime."""
