"""agents: policies, objectives (MLE, BC, SequenceMatch), the trainer and the `seqmatch` command.

``from agents import SequenceMatch, MLE, BC`` gives the Stable-Baselines3-style facade.
"""

from agents.agent import BC, MLE, ImitationAgent, SequenceMatch

__all__ = ["BC", "MLE", "ImitationAgent", "SequenceMatch"]
