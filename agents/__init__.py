"""agents: policies, objectives (MLE, BC, SequenceMatch), the trainer and the `seqmatch` command."""
